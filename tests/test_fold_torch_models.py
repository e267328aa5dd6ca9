"""fold_torch end to end on realistic architectures (written here) and on half-precision layers."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bnfold.fold_torch import fold_torch
from bnfold.layers import InputNorm
from bnfold.tolerance import Tolerance


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2))
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 6), InvertedResidual(12, 12, 1, 6),
            nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def mlp() -> nn.Module:
    model = nn.Sequential(
        InputNorm(12), nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )
    model.input_shape = (12,)  # type: ignore[assignment]
    return model


ARCHS = [
    pytest.param(ResNetish, torch.randn(2, 3, 16, 16), 9, id="resnet-projection-shortcuts"),
    pytest.param(MobileNetV2ish, torch.randn(2, 3, 16, 16), 10, id="mobilenetv2-depthwise-relu6-inverted-residual"),
    pytest.param(mlp, torch.randn(5, 12), 3, id="mlp-inputnorm"),
]


@pytest.mark.parametrize(("build", "x", "n_norms"), ARCHS)
def test_architecture_folds_completely(build: Callable[[], nn.Module], x: torch.Tensor, n_norms: int,
                                       fold_check, randomize) -> None:
    model = randomize(build()).eval()
    result = fold_check(model, x, folded=n_norms, left=0)
    assert result.skipped == []


def test_architecture_folds_with_example_inputs_in_train_mode(fold_check, randomize) -> None:
    model = randomize(ResNetish()).train()
    result = fold_check(model, torch.randn(2, 3, 16, 16), folded=9, left=0, example_inputs=torch.randn(1, 3, 8, 8))
    assert model.training and result.notes[0].startswith("model was in train mode")


# Half precision. The folded weights are rounded to the layer dtype once, like the original weights, so
# the folded model's error against a float64 reference is of the same size as the original model's
# (measured: float16 4.2e-3 folded vs 5.2e-3 original, bfloat16 3.8e-2 vs 3.5e-2, output scale 3-6).
# We require max|folded - ref64| <= the original's own error + 2 * eps * max|ref64|: the extra term
# allows one more rounding of the output (the folded bias is rounded where the BN used to round);
# a wrong fold misses it by orders of magnitude.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="float16"),
                                   pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize(("build", "x"), [
    pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)), torch.randn(2, 4, 6, 6), id="conv"),
    pytest.param(lambda: nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), torch.randn(4, 8), id="linear"),
    pytest.param(lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d(6)),
                 torch.randn(2, 4, 5), id="convtranspose"),
])
def test_half_precision_layers(build: Callable[[], nn.Module], x: torch.Tensor, dtype: torch.dtype,
                               randomize) -> None:
    model = randomize(build()).eval()
    ref64 = copy.deepcopy(model).double()(x.double()).detach()
    half = copy.deepcopy(model).to(dtype)
    result = fold_torch(half)
    assert len(result.folded) == 2 if isinstance(model[0], nn.Conv2d) else len(result.folded) == 1
    folded = result.model
    assert all(p.dtype == dtype for p in folded.parameters())
    with torch.no_grad():
        got = folded(x.to(dtype)).double()
        orig = half(x.to(dtype)).double()
    eps = torch.finfo(dtype).eps
    own_error = float((orig - ref64).abs().max())
    tol = Tolerance(atol=own_error, rtol=2 * eps)
    cmp = tol.compare(got.numpy(), ref64.numpy())
    assert cmp.passed, (cmp, own_error)
