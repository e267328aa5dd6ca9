"""fold_torch.branches: RepVGG / ACNet / MobileOne blocks merge into one convolution, exactly or not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.manual_seed(0)


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0,
            groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGG(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ identity BN when shapes allow), summed, then ReLU."""

    def __init__(self, cin: int = 4, cout: int = 4, stride: int = 1, groups: int = 1, identity: bool = True) -> None:
        super().__init__()
        self.kxk, self.k1 = conv_bn(cin, cout, 3, stride, 1, groups), conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if identity and cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kxk(x) + self.k1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class ACNet(nn.Module):
    """Asymmetric convolutions: 3x3 + 1x3 + 3x1 branches (the MobileOne style 'out = 0; out += b(x)')."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(3, 5, 3, 1, 1), conv_bn(3, 5, (1, 3), 1, (0, 1)),
                                       conv_bn(3, 5, (3, 1), 1, (1, 0))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for branch in self.branches:
            out += branch(x)
        return out


class Misaligned(nn.Module):
    """3x3 and 1x1 branches without padding: the 1x1 output is cropped to add, so it is not a plain branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 4, 3, 1, 0), conv_bn(3, 4, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)[:, :, 1:-1, 1:-1]


class OtherInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 4, 3, 1, 1), conv_bn(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x * 2)


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize(("build", "cin", "convs"), [
    pytest.param(lambda: RepVGG(), 4, 1, id="repvgg-identity"),
    pytest.param(lambda: RepVGG(4, 6), 4, 1, id="repvgg-no-identity"),
    pytest.param(lambda: RepVGG(4, 6, stride=2), 4, 1, id="repvgg-stride-2"),
    pytest.param(lambda: RepVGG(6, 6, groups=3), 6, 1, id="repvgg-grouped-identity"),
    pytest.param(ACNet, 3, 1, id="acnet-asymmetric"),
])
def test_parallel_branches_merge_into_one_conv(build, cin: int, convs: int, fold_check, randomize) -> None:
    model = randomize(build()).eval()
    x = torch.randn(2, cin, 9, 9)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    result = fold_check(model, x, folded=norms, left=0, example_inputs=x)
    assert _convs(result.model) == convs
    assert any("structural re-parameterization" in n for n in result.notes)


def test_identity_bn_is_reported_folded_into_the_merged_conv(fold_check, randomize) -> None:
    x = torch.randn(2, 4, 9, 9)
    result = fold_check(randomize(RepVGG()).eval(), x, folded=3, left=0, example_inputs=x)
    assert ("identity", "kxk.0") in {(f.bn, f.into) for f in result.folded}


@pytest.mark.parametrize("build", [pytest.param(Misaligned, id="sliced-branch"),
                                   pytest.param(OtherInput, id="different-inputs")])
def test_branches_that_do_not_merge_exactly_stay(build, fold_check, randomize) -> None:
    x = torch.randn(2, 3, 9, 9)
    result = fold_check(randomize(build()).eval(), x, folded=2, left=0, example_inputs=x)
    assert _convs(result.model) == 2 and not any("re-parameterization" in n for n in result.notes)
