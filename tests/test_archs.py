"""The architecture registry: shapes, BN/no-BN variants, fx-traceability, fold-friendly first layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold.archs import ARCHITECTURES, build_model, resolve_config
from bnfold.errors import BnfoldError
from bnfold.layers import InputNorm

SHAPES = {"mlp": (30,), "cnn": (1, 8, 8), "resnet": (3, 8, 8), "mobilenet": (1, 8, 8), "conv1d": (2, 64)}
CASES = [pytest.param(name, norm, id=f"{name}-{norm}") for name in ARCHITECTURES for norm in ("bn", "none")]


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_registry_lists_the_five_architectures() -> None:
    assert list(ARCHITECTURES) == ["mlp", "cnn", "resnet", "mobilenet", "conv1d"]


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_builds_traces_and_carries_input_shape(name: str, norm: str) -> None:
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, input_shape=shape, num_classes=7, norm=norm).eval()
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 7)
    assert model.input_shape == shape
    assert isinstance(model.get_submodule("input_norm"), InputNorm)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    assert (len(_bns(model)) > 0) == (norm == "bn")


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "mlp"])
def test_first_conv_pads_with_replicate_so_input_norm_folds_exactly(name: str) -> None:
    model = build_model(name, input_shape=SHAPES[name], num_classes=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    assert convs[0].padding_mode == "replicate"
    assert all(c.padding_mode == "zeros" for c in convs[1:])


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_layers_have_a_bias_only_without_bn(norm: str) -> None:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=3, norm=norm)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == (norm == "none") for c in convs)


def test_resnet_has_projection_shortcuts_where_shape_changes() -> None:
    model = build_model("resnet", input_shape=(1, 8, 8), num_classes=10, width=8, depth=3)
    shortcuts = [m.shortcut for m in model.modules() if hasattr(m, "shortcut")]
    kinds = [type(s).__name__ for s in shortcuts]
    assert kinds == ["Identity", "Sequential", "Sequential"]
    proj = shortcuts[1][0]
    assert isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1) and proj.stride == (2, 2)


def test_mobilenet_uses_depthwise_convs_and_relu6() -> None:
    model = build_model("mobilenet", input_shape=(1, 8, 8), num_classes=10, width=8, depth=2, expansion=3)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "config", "linears_or_convs"),
    [
        pytest.param("mlp", {"width": 16, "depth": 4}, 5, id="mlp-depth4"),
        pytest.param("cnn", {"width": 8, "depth": 1, "convs_per_stage": 3}, 4, id="cnn-3convs"),
        pytest.param("conv1d", {"width": 8, "depth": 2}, 3, id="conv1d-depth2"),
    ],
)
def test_width_and_depth_are_configurable(name: str, config: dict[str, int], linears_or_convs: int) -> None:
    """Counts include the head's Linear."""
    model = build_model(name, input_shape=SHAPES[name], num_classes=3, **config)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    assert len(layers) == linears_or_convs
    first = layers[0]
    assert (first.out_features if isinstance(first, nn.Linear) else first.out_channels) == config["width"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"name": "vgg"}, "unknown architecture 'vgg'; known: mlp, cnn, resnet, mobilenet, conv1d",
                     id="unknown-arch"),
        pytest.param({"name": "cnn", "norm": "ln"}, "norm must be one of bn, none, got 'ln'", id="bad-norm"),
        pytest.param({"name": "cnn", "input_shape": (64,)}, "cnn expects inputs of shape (channels, height, width), "
                     "got (64,)", id="wrong-rank"),
        pytest.param({"name": "cnn", "num_classes": 1}, "num_classes must be an integer >= 2, got 1", id="one-class"),
        pytest.param({"name": "cnn", "widht": 3}, "cnn: unknown config key(s) widht", id="unknown-key"),
        pytest.param({"name": "cnn", "width": 0}, "cnn: width must be a positive integer, got 0", id="zero-width"),
        pytest.param({"name": "cnn", "depth": 4}, "input (1, 8, 8) is too small for depth=4 (spatial size 8 < "
                     "downsampling factor 16)", id="too-deep"),
        pytest.param({"name": "conv1d", "input_shape": (1, 64), "kernel_size": 4},
                     "conv1d: kernel_size must be odd (for 'same' padding), got 4", id="even-kernel"),
        pytest.param({"name": "resnet", "depth": 5}, "input (1, 8, 8) is too small for depth=5 (spatial size 8 < "
                     "downsampling factor 16)", id="resnet-too-deep"),
    ],
)
def test_bad_requests_name_the_values(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(BnfoldError) as info:
        build_model(**args)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_resolve_config_merges_defaults() -> None:
    assert resolve_config("cnn", {"width": 4}) == {**ARCHITECTURES["cnn"].defaults, "width": 4}
