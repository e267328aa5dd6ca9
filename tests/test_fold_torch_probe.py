"""fold_torch.probe: Conv/Linear subclasses with a forward of their own fold from the output side only when
a probe shows it is exact (timm's ``Conv2dSame`` does; a weight-standardized conv does not)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.fold_torch import fold_torch
from bnfold.fold_torch.probe import output_foldable

torch.manual_seed(0)


class Conv2dSame(nn.Conv2d):
    """timm's layout: TensorFlow 'SAME' padding computed from the input size (untraceable), then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardization: scaling a filter is normalized away, so no fold into it is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * 0.5, self.weight, self.bias)


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.post = conv, nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(F.relu(self.bn(self.conv(x))))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 11, 11)


@pytest.mark.parametrize("conv", [
    pytest.param(lambda: Conv2dSame(3, 4, 3, stride=2, bias=False), id="same-padding-no-bias"),
    pytest.param(lambda: Conv2dSame(3, 6, 5, groups=3), id="same-padding-grouped"),
])
def test_probed_conv_folds_from_the_output_side(conv, fold_check, randomize) -> None:
    model = randomize(ConvBN(conv(), conv().out_channels)).eval()
    result = fold_check(model, _x(), folded=1, left=1, example_inputs=_x())
    assert [(f.bn, f.into, f.side) for f in result.folded] == [("bn", "conv", "output")]
    assert "post" in {s.bn for s in result.skipped}


class UntraceableStdConv(StdConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # data-dependent control flow: torch.fx cannot trace into it
            raise ValueError("4-D input expected")
        return super().forward(x)


@pytest.mark.parametrize("conv", [StdConv2d, UntraceableStdConv])
def test_weight_standardized_conv_is_refused_by_the_probe(conv: type[nn.Conv2d], randomize) -> None:
    model = randomize(ConvBN(conv(3, 4, 3), 4)).eval()
    result = fold_torch(model, example_inputs=_x())
    reason = next(s.reason for s in result.skipped if s.bn == "bn")
    assert "a probe shows that scaling its weights per output channel does not scale its output" in reason


class FunctionalStd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.bn = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.w - self.w.mean((1, 2, 3), keepdim=True)) / self.w.std((1, 2, 3), keepdim=True)
        return self.bn(F.conv2d(x, w))


def test_functional_conv_on_a_computed_weight_names_the_op(randomize) -> None:
    result = fold_torch(randomize(FunctionalStd()).eval(), example_inputs=_x())
    (skipped,) = result.skipped
    assert "the weight of conv2d (conv2d) is computed at run time (by truediv)" in skipped.reason


def test_probed_layer_refuses_the_input_side(randomize) -> None:
    model = randomize(nn.Sequential(nn.BatchNorm1d(4), ScaledLinear(4, 3))).eval()
    result = fold_torch(model, example_inputs=torch.randn(2, 4))
    (skipped,) = result.skipped
    assert "folds into it only from the output side" in skipped.reason


@pytest.mark.parametrize(("layer", "foldable"), [
    pytest.param(lambda: Conv2dSame(3, 4, 3), True, id="conv2d-same"),
    pytest.param(lambda: ScaledLinear(4, 3), True, id="input-scaling-linear"),
    pytest.param(lambda: StdConv2d(3, 4, 3), False, id="weight-standardized"),
])
def test_output_probe(layer, foldable: bool) -> None:
    module = layer().eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert output_foldable(module) is foldable
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # probed on a copy
