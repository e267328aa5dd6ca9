"""bnfold.verify: float64 reference, error measures, top-1 agreement, any mix of torch/ONNX models."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BnfoldError, VerificationFailed
from bnfold.export import to_onnx
from bnfold.tolerance import Tolerance
from bnfold.verification import Baseline, baseline_outputs, ort_runner, top1_agreement, verify


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                      nn.Linear(6 * 5 * 5, 4))
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _inputs(n: int = 32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 2, 5, 5)).astype(np.float32)


def _perturbed(model: nn.Module, delta: float) -> nn.Module:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[4].bias.add_(delta)  # every logit moves by exactly delta
    return bad


def test_identical_models_pass_with_float64_rows() -> None:
    m = _model()
    rep = verify(m, copy.deepcopy(m), _inputs())
    assert rep.passed and rep.reason is None
    assert rep.n_samples == 32
    assert rep.top1_agreement == 1.0
    assert [(r.actual, r.reference, r.gating) for r in rep.rows] == [
        ("folded (float32)", "original (float64)", True),
        ("original (float32)", "original (float64)", False),
        ("folded (float32)", "original (float32)", False),
    ]
    # A float32 copy is exactly the original: zero difference, and float32 rounding vs float64 is tiny but nonzero.
    assert rep.rows[2].max_abs_error == 0.0
    assert 0.0 < rep.rows[1].max_abs_error < 1e-5
    assert rep.max_abs_error == rep.rows[0].max_abs_error


def test_folded_model_passes_within_default_tolerance() -> None:
    m = _model()
    rep = bnfold.verify(m, bnfold.fold(m).model, torch.from_numpy(_inputs()))
    assert rep.passed, rep.summary()
    assert rep.max_abs_error < 1e-5
    assert rep.top1_agreement == 1.0


@pytest.mark.parametrize(
    ("delta", "passed"),
    [pytest.param(1e-7, True, id="below-atol"), pytest.param(1e-2, False, id="above-tolerance")],
)
def test_error_is_measured_exactly(delta: float, passed: bool) -> None:
    m = _model()
    rep = verify(m, _perturbed(m, delta), _inputs(), tolerance=Tolerance(atol=1e-5, rtol=0.0))
    assert rep.passed is passed
    assert rep.allowed == pytest.approx(1e-5, abs=0)
    assert rep.max_abs_error == pytest.approx(delta, rel=1e-3, abs=2e-6)


def test_raise_if_failed_names_measured_and_allowed() -> None:
    m = _model()
    rep = verify(m, _perturbed(m, 0.5), _inputs())
    reason = f"max abs error 0.5 > allowed {rep.allowed:.3g} (atol 1e-05 + rtol 0.0001 * output scale)"
    assert rep.reason == reason
    assert rep.summary().startswith(f"FAILED on 32 inputs samples: {reason}; max rel error")
    with pytest.raises(VerificationFailed, match=re.escape(f"against original (float64) on 32 inputs samples: {reason}")
                       + "$"):
        rep.raise_if_failed()
    assert VerificationFailed("x").exit_code == 1


def test_zero_tolerance_fails_a_real_fold() -> None:
    m = _model()
    rep = verify(m, bnfold.fold(m).model, _inputs(), tolerance=Tolerance(atol=0.0, rtol=0.0))
    assert not rep.passed
    assert rep.max_abs_error > 0


def test_onnx_and_torch_in_any_mix(tmp_path) -> None:
    m = _model()
    proto = to_onnx(bnfold.fold(m).model, (2, 5, 5))
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    for candidate in (proto, path, str(path)):
        rep = verify(m, candidate, _inputs())
        assert rep.passed, rep.summary()
        assert rep.reference == "original (float64)"
        assert rep.max_abs_error < 1e-5
    onnx_first = verify(proto, m, _inputs())  # no float64 copy of an ONNX model: the original is the reference
    assert onnx_first.reference == "original"
    assert len(onnx_first.rows) == 1
    assert onnx_first.passed


def test_original_is_not_modified_or_left_in_eval() -> None:
    m = _model().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    verify(m, copy.deepcopy(m).eval(), _inputs())
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_report_is_json_serializable() -> None:
    m = _model()
    body = json.loads(json.dumps(verify(m, m, _inputs(), inputs_label="random").to_dict()))
    assert body["passed"] is True
    assert body["inputs"] == "random"
    assert body["tolerance"] == {"atol": 1e-5, "rtol": 1e-4}
    assert len(body["rows"]) == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        pytest.param(np.zeros((0, 2, 5, 5), np.float32), "non-empty batch", id="empty-batch"),
        pytest.param(np.float32(1.0), "non-empty batch", id="scalar"),
    ],
)
def test_bad_inputs_raise(inputs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        verify(_model(), _model(), inputs)


def test_empty_inputs_with_a_precomputed_baseline_raise() -> None:
    """Regression: with an (empty) baseline the empty-batch check was skipped and numpy failed instead."""
    empty = np.zeros((0, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"non-empty batch of inputs, got shape \(0, 2, 5, 5\)"):
        verify(_model(), _model(), empty, baseline=Baseline(np.zeros((0, 4), np.float32), None))


class _Outputs(nn.Module):
    """``model``'s output passed through ``edit`` (to make it empty or non-finite)."""

    def __init__(self, model: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.edit = model, edit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.edit(self.model(x))


def _nan_at(i: int, j: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        y[i, j] = float("nan")
        return y

    return edit


def _no_samples(y: torch.Tensor) -> torch.Tensor:
    return y[:0]


def _no_classes(y: torch.Tensor) -> torch.Tensor:
    return y[:, :0]


def _all_nan(y: torch.Tensor) -> torch.Tensor:
    return y * float("nan")


def _all_inf(y: torch.Tensor) -> torch.Tensor:
    return y * float("inf")


def _same(y: torch.Tensor) -> torch.Tensor:
    return y


@pytest.mark.parametrize(
    ("edit_original", "edit_folded", "reason"),
    [
        pytest.param(_no_samples, _no_samples,
                     "nothing was compared: the outputs have shape (0, 4), no samples for 32 inputs", id="no-samples"),
        pytest.param(_no_classes, _no_classes,
                     "nothing was compared: the outputs have shape (32, 0), which holds no values",
                     id="zero-size-outputs"),
    ],
)
def test_comparing_nothing_fails_with_reason(edit_original: Callable[[torch.Tensor], torch.Tensor],
                                             edit_folded: Callable[[torch.Tensor], torch.Tensor], reason: str) -> None:
    """Regression: empty outputs "passed" (the max error of nothing is 0) with top-1 agreement nan%."""
    m = _model()
    rep = verify(_Outputs(m, edit_original), _Outputs(copy.deepcopy(m), edit_folded), _inputs())
    assert rep.passed is False
    assert rep.reason == reason
    assert rep.top1_agreement is None
    assert rep.summary().startswith(f"FAILED on 32 inputs samples: {reason}; ")
    assert rep.to_dict()["reason"] == reason
    with pytest.raises(VerificationFailed, match=re.escape(reason)):
        rep.raise_if_failed()


def _empty_onnx() -> onnx.ModelProto:
    """(N, 3) -> (N, 0): a Slice over no columns."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 0])
    inits = [onnx.numpy_helper.from_array(np.array([v], np.int64), n) for n, v in [("s", 0), ("e", 0), ("a", 1)]]
    graph = h.make_graph([h.make_node("Slice", ["x", "s", "e", "a"], ["y"])], "g", [x], [y], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=10)


def test_comparing_nothing_fails_for_onnx_models_too() -> None:
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    rep = verify(_empty_onnx(), _empty_onnx(), x)
    assert rep.passed is False
    assert rep.reason == "nothing was compared: the outputs have shape (6, 0), which holds no values"


@pytest.mark.parametrize(
    ("edit_original", "edit_folded", "tolerance", "reason"),
    [
        pytest.param(_same, _nan_at(3, 1), Tolerance(),
                     "folded (float32) in 1 of 128 values", id="one-nan-in-folded"),
        pytest.param(_same, _all_inf, Tolerance(), "folded (float32) in 128 of 128 values", id="all-inf-in-folded"),
        pytest.param(_all_nan, _same, Tolerance(), "original (float32) in 128 of 128 values; original (float64) in "
                     "128 of 128 values", id="nan-in-original"),
        pytest.param(_all_nan, _all_nan, Tolerance(), "folded (float32) in 128 of 128 values; original (float32) "
                     "in 128 of 128 values; original (float64) in 128 of 128 values", id="nan-in-both"),
        pytest.param(_nan_at(0, 0), _nan_at(0, 0), Tolerance(atol=float("inf"), rtol=0.0),
                     "folded (float32) in 1 of 128 values", id="same-nan-even-with-infinite-tolerance"),
    ],
)
def test_non_finite_outputs_never_pass(edit_original: Callable[[torch.Tensor], torch.Tensor],
                                       edit_folded: Callable[[torch.Tensor], torch.Tensor], tolerance: Tolerance,
                                       reason: str) -> None:
    """NaN/inf already failed (NaN compares false), but with "max abs error nan > allowed nan"; now the
    reason says which outputs are not finite."""
    m = _model()
    rep = verify(_Outputs(m, edit_original), _Outputs(copy.deepcopy(m), edit_folded), _inputs(), tolerance=tolerance)
    assert rep.passed is False
    assert rep.reason is not None and rep.reason.startswith("outputs hold NaN or infinity: ")
    assert reason in rep.reason, rep.reason
    with pytest.raises(VerificationFailed, match="outputs hold NaN or infinity"):
        rep.raise_if_failed()


def test_output_shape_mismatch_names_both_shapes() -> None:
    other = nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).eval()
    with pytest.raises(BnfoldError, match=r"\(32, 4\) vs \(32, 3\)"):
        verify(_model(), other, _inputs())


def test_unknown_model_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        verify(_model(), object(), _inputs())


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param([[1, 0], [0, 1]], [[2, 1], [1, 0]], 0.5, id="half"),
        pytest.param([[1, 0], [0, 1]], [[1, 0], [0, 1]], 1.0, id="all"),
        pytest.param([[1], [2]], [[1], [2]], None, id="single-output"),
    ],
)
def test_top1_agreement(a: list[list[float]], b: list[list[float]], expected: float | None) -> None:
    assert top1_agreement(np.array(a, float), np.array(b, float)) == expected


def test_precomputed_baseline_gives_the_same_report() -> None:
    m = _model()
    folded = bnfold.fold(m).model
    x = _inputs()
    base = baseline_outputs(m, x)
    assert base.float64 is not None and base.float64.dtype == np.float64
    assert verify(m, folded, x, baseline=base) == verify(m, folded, x)
    with pytest.raises(ValueError, match="baseline has 32 samples but inputs have 8"):
        verify(m, folded, x[:8], baseline=base)


def _relu_onnx(batch: int | str, ir_version: int = 10) -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=ir_version)


@pytest.mark.parametrize("batch", [pytest.param(1, id="batch-1"), pytest.param(4, id="batch-4-padded")])
def test_fixed_batch_onnx_models_run_in_chunks(batch: int) -> None:
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    np.testing.assert_array_equal(ort_runner(_relu_onnx(batch))(x), np.maximum(x, 0))


def test_onnxruntime_run_failure_names_the_shapes() -> None:
    with pytest.raises(BnfoldError, match=r"failed on input 'x' of shape \[2, 5\]"):
        ort_runner(_relu_onnx("N"))(np.zeros((2, 5), np.float32))


def test_onnxruntime_load_failure_is_one_readable_line() -> None:
    with pytest.raises(BnfoldError, match=r"^onnxruntime cannot load the model: Unsupported model IR version: 99"):
        ort_runner(_relu_onnx("N", ir_version=99))


def test_tolerance_compare_of_nothing_does_not_pass() -> None:
    """An empty comparison (e.g. a certificate self-test with zero rows) shows nothing, so it fails."""
    empty = np.zeros((0, 10), np.float32)
    assert not Tolerance().compare(empty, empty).passed
    assert Tolerance().compare(np.ones(3), np.ones(3)).passed
