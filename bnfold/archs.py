"""The architecture registry: small classifiers with and without batch norm, built by name.

Every model is ``input_norm -> features -> head``, an ``nn.Sequential`` with three named children:

* ``input_norm``: :class:`~bnfold.layers.InputNorm`, the input normalization fitted on the
  training split (identity until the trainer sets it). Its per-channel affine map folds exactly
  into the first layer, so the first convolution pads with ``replicate`` (replicate padding
  commutes with a per-channel affine map; zero padding does not).
* ``features``: the architecture's blocks;
* ``head``: global average pooling (for spatial inputs), flatten, one ``Linear``.

``norm="bn"`` puts a batch norm after every convolution/linear layer of ``features`` (those layers
then have no bias, since the batch norm's shift replaces it); ``norm="none"`` drops the batch
norms and gives the layers a bias, so training with and without BN can be compared.

Every model is torch.fx-traceable (no data-dependent Python control flow) and carries
``model.input_shape`` (the input shape without the batch dimension).

Configuration is two numbers shared by all architectures, plus a few specific ones:
``width`` (channels or hidden units of the first stage) and ``depth`` (number of stages or
blocks). :data:`ARCHITECTURES` lists each architecture's defaults and its default training
hyper-parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.layers import InputNorm

NORMS = ("bn", "none")


@dataclass(frozen=True)
class TrainDefaults:
    """Hyper-parameters that reach >= 0.95 validation accuracy quickly on the reference data set."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class ArchSpec:
    name: str
    description: str
    input_rank: int  # rank of one sample: 1 tabular (F,), 2 sequence (C, L), 3 image (C, H, W)
    factory: Callable[..., nn.Sequential]
    defaults: dict[str, Any]  # architecture config defaults (width, depth, ...)
    train: TrainDefaults
    reference_dataset: str  # the bundled data set the training defaults are tuned on


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)


def _conv(dims: int, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1,
          bias: bool, first: bool = False) -> nn.Module:
    """A 'same'-padded convolution; the first layer pads with replicate so InputNorm folds exactly."""
    cls = nn.Conv2d if dims == 2 else nn.Conv1d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias,
               padding_mode="replicate" if first else "zeros")


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BnfoldError(f"{name}: {key} must be a positive integer, got {value!r}")


def _assemble(input_shape: tuple[int, ...], layers: list[nn.Module], head: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict([("input_norm", InputNorm(input_shape[0])), ("features", nn.Sequential(*layers)), ("head", head)])
    )


def _head(dims: int, channels: int, num_classes: int) -> nn.Sequential:
    pool: nn.Module = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(channels, num_classes))


def _mlp(input_shape: tuple[int, ...], num_classes: int, norm: str, *, width: int, depth: int,
         dropout: float) -> nn.Sequential:
    """``depth`` blocks of Linear(width)-BN-ReLU[-Dropout], then Linear(num_classes)."""
    _check_positive("mlp", width=width, depth=depth)
    layers: list[nn.Module] = []
    features = input_shape[0]
    for _ in range(depth):
        layers += [nn.Linear(features, width, bias=norm == "none"), _norm(norm, 0, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        features = width
    return _assemble(input_shape, layers, nn.Sequential(nn.Linear(features, num_classes)))


def _cnn(input_shape: tuple[int, ...], num_classes: int, norm: str, *, width: int, depth: int,
         convs_per_stage: int) -> nn.Sequential:
    """VGG-style: ``depth`` stages of ``convs_per_stage`` x (Conv3x3-BN-ReLU) then MaxPool2; width doubles."""
    _check_positive("cnn", width=width, depth=depth, convs_per_stage=convs_per_stage)
    _check_spatial("cnn", input_shape, depth, 2 ** depth)
    layers: list[nn.Module] = []
    cin, cout = input_shape[0], width
    for stage in range(depth):
        for i in range(convs_per_stage):
            first = stage == 0 and i == 0
            layers += [_conv(2, cin, cout, 3, bias=norm == "none", first=first), _norm(norm, 2, cout), nn.ReLU()]
            cin = cout
        layers.append(nn.MaxPool2d(2))
        cout *= 2
    return _assemble(input_shape, layers, _head(2, cin, num_classes))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a 1x1 conv + BN
    (a projection) when the stride or the channel count changes, the identity otherwise."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = _conv(2, cin, cout, 3, stride=stride, bias=bias)
        self.bn1 = _norm(norm, 2, cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(2, cout, cout, 3, bias=bias)
        self.bn2 = _norm(norm, 2, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), _norm(norm, 2, cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _resnet(input_shape: tuple[int, ...], num_classes: int, norm: str, *, width: int, depth: int,
            blocks_per_stage: int) -> nn.Sequential:
    """Stem Conv3x3-BN-ReLU, then ``depth`` stages of basic blocks (stride 2 and doubled width from stage 2)."""
    _check_positive("resnet", width=width, depth=depth, blocks_per_stage=blocks_per_stage)
    _check_spatial("resnet", input_shape, depth, 2 ** (depth - 1))
    layers: list[nn.Module] = [
        _conv(2, input_shape[0], width, 3, bias=norm == "none", first=True), _norm(norm, 2, width), nn.ReLU()
    ]
    cin = width
    for stage in range(depth):
        cout = width * 2 ** stage
        for i in range(blocks_per_stage):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norm))
            cin = cout
    return _assemble(input_shape, layers, _head(2, cin, num_classes))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (linear),
    plus the input when the stride is 1 and the channel count is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout  # fixed at construction: fx-traceable
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=bias), _norm(norm, 2, hidden), nn.ReLU6(),
            _conv(2, hidden, hidden, 3, stride=stride, groups=hidden, bias=bias), _norm(norm, 2, hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=bias), _norm(norm, 2, cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


def _mobilenet(input_shape: tuple[int, ...], num_classes: int, norm: str, *, width: int, depth: int,
               expansion: int) -> nn.Sequential:
    """Stem Conv3x3-BN-ReLU6, then ``depth`` stages of two inverted residuals (stride 2, doubled width from stage 2)."""
    _check_positive("mobilenet", width=width, depth=depth, expansion=expansion)
    _check_spatial("mobilenet", input_shape, depth, 2 ** (depth - 1))
    layers: list[nn.Module] = [
        _conv(2, input_shape[0], width, 3, bias=norm == "none", first=True), _norm(norm, 2, width), nn.ReLU6()
    ]
    cin = width
    for stage in range(depth):
        cout = width * 2 ** stage
        layers.append(InvertedResidual(cin, cout, 2 if stage > 0 else 1, expansion, norm))
        layers.append(InvertedResidual(cout, cout, 1, expansion, norm))
        cin = cout
    return _assemble(input_shape, layers, _head(2, cin, num_classes))


def _conv1d(input_shape: tuple[int, ...], num_classes: int, norm: str, *, width: int, depth: int,
            kernel_size: int) -> nn.Sequential:
    """``depth`` stages of Conv1d-BN-ReLU then MaxPool1d(2); width doubles per stage."""
    _check_positive("conv1d", width=width, depth=depth, kernel_size=kernel_size)
    if kernel_size % 2 == 0:
        raise BnfoldError(f"conv1d: kernel_size must be odd (for 'same' padding), got {kernel_size}")
    _check_spatial("conv1d", input_shape, depth, 2 ** depth)
    layers: list[nn.Module] = []
    cin, cout = input_shape[0], width
    for stage in range(depth):
        layers += [_conv(1, cin, cout, kernel_size, bias=norm == "none", first=stage == 0), _norm(norm, 1, cout),
                   nn.ReLU(), nn.MaxPool1d(2)]
        cin, cout = cout, cout * 2
    return _assemble(input_shape, layers, _head(1, cin, num_classes))


def _check_spatial(name: str, input_shape: tuple[int, ...], depth: int, reduction: int) -> None:
    """Each spatial size must survive the ``reduction``-fold downsampling of ``depth`` stages."""
    small = min(input_shape[1:])
    if small < reduction:
        raise BnfoldError(
            f"{name}: input {tuple(input_shape)} is too small for depth={depth} "
            f"(spatial size {small} < downsampling factor {reduction}); lower depth or use larger inputs"
        )


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("mlp", "Linear-BN-ReLU blocks, for tabular data", 1, _mlp,
                 {"width": 64, "depth": 2, "dropout": 0.0}, TrainDefaults(30, 32, 3e-3), "breast-cancer"),
        ArchSpec("cnn", "Conv-BN-ReLU, VGG-style, for images", 3, _cnn,
                 {"width": 16, "depth": 2, "convs_per_stage": 2}, TrainDefaults(12, 64, 3e-3), "digits"),
        ArchSpec("resnet", "residual basic blocks with projection shortcuts, for images", 3, _resnet,
                 {"width": 16, "depth": 3, "blocks_per_stage": 1}, TrainDefaults(12, 64, 3e-3), "digits"),
        ArchSpec("mobilenet", "inverted residuals with depthwise convs and ReLU6, for images", 3, _mobilenet,
                 {"width": 16, "depth": 2, "expansion": 4}, TrainDefaults(15, 64, 3e-3), "digits"),
        ArchSpec("conv1d", "Conv1d-BN-ReLU blocks, for sequences", 2, _conv1d,
                 {"width": 32, "depth": 3, "kernel_size": 5}, TrainDefaults(15, 64, 3e-3), "digits"),
    )
}


def get_arch(name: str) -> ArchSpec:
    """The registry entry for ``name``; a BnfoldError listing the known names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise BnfoldError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def resolve_config(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture's defaults updated with ``config``; unknown keys are an error."""
    spec = get_arch(name)
    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.defaults))
    if unknown:
        raise BnfoldError(
            f"{name}: unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(spec.defaults))}"
        )
    return {**spec.defaults, **config}


def build_model(name: str, *, input_shape: tuple[int, ...] | list[int], num_classes: int, norm: str = "bn",
                **config: Any) -> nn.Module:
    """Build architecture ``name`` for inputs of ``input_shape`` (no batch dim) and ``num_classes`` outputs.

    ``config`` overrides the architecture's defaults (see :data:`ARCHITECTURES`). The model is in
    training mode, float32, with ``model.input_shape`` set and an identity ``input_norm``.
    """
    spec = get_arch(name)
    if norm not in NORMS:
        raise BnfoldError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != spec.input_rank or any(d < 1 for d in shape):
        want = {1: "(features,)", 2: "(channels, length)", 3: "(channels, height, width)"}[spec.input_rank]
        raise BnfoldError(f"{name} expects inputs of shape {want}, got {shape}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise BnfoldError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")
    model = spec.factory(shape, num_classes, norm, **resolve_config(name, config))
    setattr(model, "input_shape", shape)  # noqa: B010 - nn.Module.__setattr__ is typed for tensors/modules
    return model
