"""fold_torch on functional layers: F.conv2d / F.linear in a forward, and torch.export graphs (aten nodes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.fold_torch import fold_torch
from bnfold.fold_torch.lift import lift_functional_layers
from bnfold.fold_torch.trace import trace

torch.manual_seed(0)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn1 = nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.fc(F.relu(self.bn(self.conv(x))).flatten(1)))


class FunctionalConv(nn.Module):
    """Weights as plain parameters used through F.conv2d / F.linear, each next to a batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.bn, self.pre = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.w2 = nn.Parameter(torch.randn(4, 6, 1, 1) * 0.3)
        self.fw, self.fb = nn.Parameter(torch.randn(3, 4) * 0.3), nn.Parameter(torch.randn(3))
        self.bn1 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(F.conv2d(x, self.w, None, 1, 1)))
        z = F.conv2d(self.pre(y), self.w2)  # BN before a conv without padding: the input side
        return self.bn1(F.linear(z.mean((2, 3)), self.fw, self.fb))


class ComputedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.bn = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.w * 2))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def test_functional_layers_fold_on_both_sides(fold_check, randomize) -> None:
    result = fold_check(randomize(FunctionalConv()).eval(), _x(), folded=3, left=0, example_inputs=_x())
    assert {(f.bn, f.side) for f in result.folded} == {("bn", "output"), ("pre", "input"), ("bn1", "output")}


def test_torch_export_graph_folds_under_the_original_names(randomize) -> None:
    model = randomize(Head()).eval()
    x = _x()
    exported = torch.export.export(model, (x,)).module()
    result = fold_torch(exported, example_inputs=x)
    assert {(f.bn, f.into) for f in result.folded} == {("bn", "conv"), ("bn1", "fc")}
    assert result.skipped == []
    assert set(dict(result.model.named_parameters())) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in result.model.graph.nodes)
    with torch.no_grad():
        reference = model.double()(x.double())
        got = result.model(x)
    scale = float(reference.abs().max())
    assert float((got.double() - reference).abs().max()) <= 1e-5 + 1e-4 * scale


def test_decomposed_export_graph_reports_its_batch_norms(randomize) -> None:
    model = randomize(Head()).eval()
    program = torch.export.export(model, (_x(),)).run_decompositions()
    result = fold_torch(program.module(), example_inputs=_x())
    assert result.folded == []
    assert sorted(s.bn for s in result.skipped) == ["bn", "bn1"]
    assert all("decomposed batch norm" in s.reason and "before decomposing" in s.reason for s in result.skipped)


def test_computed_weight_is_not_lifted_and_the_reason_says_so(randomize) -> None:
    result = fold_torch(randomize(ComputedWeight()).eval(), example_inputs=_x())
    (skipped,) = result.skipped
    assert skipped.bn == "bn" and "the weight of conv2d (conv2d) is computed at run time (by mul)" in skipped.reason


@pytest.mark.parametrize(("call", "expected"), [
    pytest.param(lambda x, w: F.conv2d(x, w, None, 2, 1, 1, 1), nn.Conv2d, id="conv2d-positional"),
    pytest.param(lambda x, w: F.conv2d(x, w, stride=(1, 2), padding="valid"), nn.Conv2d, id="conv2d-keywords"),
    pytest.param(lambda x, w: torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
                 nn.Conv2d, id="aten-convolution"),
])
def test_lifted_module_computes_the_call_exactly(call, expected: type) -> None:
    class Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return call(x, self.w)

    model = Call().eval()
    gm = trace(model)
    (name,) = lift_functional_layers(gm)
    gm.recompile()
    lifted = gm.get_submodule(name)
    assert type(lifted) is expected and lifted.weight is gm.w
    assert all(len(getattr(lifted, a)) == 2 for a in ("stride", "padding", "dilation") if not isinstance(
        getattr(lifted, a), str))  # one value per spatial axis, as the ONNX exporter needs
    x = _x()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
