"""fold_torch.guard: a fold exact at one input rank only is exact at every rank (RankDispatch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.export import op_counts, to_onnx
from bnfold.fold_torch.guard import RankDispatch
from bnfold.layers import InputNorm
from bnfold.tolerance import Tolerance


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _dispatches(model: nn.Module) -> list[RankDispatch]:
    return [m for m in model.modules() if isinstance(m, RankDispatch)]


class Scaled(nn.Module):
    """``body(x * 2)``: no natural input shape can be inferred, so nothing fixes the input rank."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2)


class FunctionalBN(nn.Module):
    """``F.batch_norm`` on registered buffers after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.fc(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def _input_norm_linear() -> nn.Module:
    norm = InputNorm(6)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 2)
        norm.shift.uniform_(-1, 1)
    return nn.Sequential(norm, nn.Linear(6, 6))


# (build, folded, 2-D input, other-rank input): each folds with a dispatch when called as bnfold.fold(model)
CASES = [
    pytest.param(lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)), 1, torch.randn(5, 16),
                 torch.randn(4, 16, 16), id="reviewer-linear-bn1d"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6)), 1, torch.randn(5, 6),
                 torch.randn(4, 6, 6), id="input-side-bn1d-linear"),
    pytest.param(_input_norm_linear, 1, torch.randn(5, 6), torch.randn(4, 6, 6), id="inputnorm-linear"),
    pytest.param(FunctionalBN, 1, torch.randn(5, 6), torch.randn(4, 6, 6), id="functional-bn-after-linear"),
    pytest.param(lambda: Scaled(nn.Conv1d(4, 5, 3), nn.BatchNorm1d(5)), 1, torch.randn(2, 4, 7),
                 torch.randn(4, 7), id="conv1d-bn1d-unbatched"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6)), 2,
                 torch.randn(5, 6), torch.randn(4, 6, 6), id="chain-both-sides"),
    pytest.param(lambda: Scaled(nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6),
                                nn.BatchNorm1d(6)), 4, torch.randn(5, 6), torch.randn(4, 6, 6),
                 id="chain-two-each-side"),
]


@pytest.mark.parametrize(("build", "folded", "x2", "other"), CASES)
def test_unknown_rank_fold_is_exact_at_every_rank(build: Callable[[], nn.Module], folded: int, x2: torch.Tensor,
                                                  other: torch.Tensor, fold_check, randomize) -> None:
    model = randomize(build()).eval()
    for x in (x2, other):  # float64 reference and Tolerance defaults in fold_check
        result = fold_check(model, x, folded=folded, left=0, fold=bnfold.fold)
        assert _bns(result.model) == 0
        assert len(_dispatches(result.model)) == 1, result.model
    assert any("for " in n and "-D input" in n and "original" in n and "example_inputs" in n
               for n in result.notes), result.notes


def test_dispatch_off_rank_is_bit_identical_to_the_original(randomize) -> None:
    model = randomize(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6))).eval()
    x = torch.randn(4, 6, 6)
    with torch.no_grad():
        assert torch.equal(bnfold.fold(model).model(x), model(x))


def test_reviewer_mlp_has_no_batch_norm_left_and_equal_outputs(fold_check, randomize) -> None:
    mlp = randomize(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))).eval()
    result = fold_check(mlp, torch.randn(8, 10), folded=1, left=0, fold=bnfold.fold)
    assert result.skipped == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())


def test_example_inputs_drop_the_dispatch(fold_check, randomize) -> None:
    model = randomize(nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))).eval()
    x = torch.randn(5, 16)
    result = fold_check(model, x, folded=1, left=0, example_inputs=x)
    assert _dispatches(result.model) == []
    assert not any("dispatch" in n for n in result.notes), result.notes


@pytest.mark.parametrize(("build", "x2", "other"), [
    pytest.param(lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)), torch.randn(5, 16),
                 torch.randn(4, 16, 16), id="linear-bn1d"),
    pytest.param(lambda: Scaled(nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6)), torch.randn(5, 6),
                 torch.randn(4, 6, 6), id="chain"),
])
def test_folding_a_folded_model_again_changes_nothing(build, x2: torch.Tensor, other: torch.Tensor,
                                                      randomize) -> None:
    model = randomize(build()).eval()
    once = bnfold.fold(model).model
    twice = bnfold.fold(once)
    assert twice.folded == [] and twice.skipped == [], (twice.folded, twice.skipped)
    assert len(_dispatches(twice.model)) == 1
    with torch.no_grad():
        for x in (x2, other):
            assert torch.equal(twice.model(x), once(x))


@pytest.mark.parametrize("exporter", [pytest.param("torchscript", id="torchscript"),
                                      pytest.param("dynamo", id="dynamo", marks=pytest.mark.slow)])
def test_onnx_export_takes_the_folded_branch(randomize, exporter: str) -> None:
    model = randomize(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))).eval()
    folded = bnfold.fold(model).model
    assert len(_dispatches(folded)) == 1
    proto = to_onnx(folded, (10,), exporter=exporter)  # type: ignore[arg-type]
    counts = op_counts(proto)
    assert "BatchNormalization" not in counts and counts.get("Gemm", 0) == 2, counts
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x).double())
    same = Tolerance().compare(torch.from_numpy(got).double(), reference)
    assert same.passed, same
