"""Property test: any Conv/ConvTranspose configuration with a BN after it (or before it) folds exactly,
or, before a layer where that is not exact, is kept; the model's output never changes."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.fold_torch import fold_torch
from bnfold.tolerance import Tolerance

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    transposed = draw(st.booleans())
    cfg = {
        "dims": draw(st.integers(1, 3)),
        "transposed": transposed,
        "groups": draw(st.sampled_from([1, 2, 3])),
        "cin_g": draw(st.integers(1, 2)),
        "cout_g": draw(st.integers(1, 3)),
        "kernel": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 2)),
        "padding_mode": "zeros" if transposed else draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        "bias": draw(st.booleans()),
        "bn_before": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
    return cfg


def build(cfg: dict) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(cfg["seed"])
    d, g = cfg["dims"], cfg["groups"]
    cin, cout = cfg["cin_g"] * g, cfg["cout_g"] * g
    layer_cls = CONVT[d] if cfg["transposed"] else CONV[d]
    kw = {"stride": cfg["stride"], "dilation": cfg["dilation"], "padding": cfg["padding"], "groups": g,
          "bias": cfg["bias"]}
    if not cfg["transposed"]:
        kw["padding_mode"] = cfg["padding_mode"]
    layer = layer_cls(cin, cout, cfg["kernel"], **kw)
    bn = BN[d](cin if cfg["bn_before"] else cout)
    with torch.no_grad():
        bn.running_mean.normal_(0.5, 1.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    model = nn.Sequential(bn, layer) if cfg["bn_before"] else nn.Sequential(layer, bn)
    x = torch.randn((2, cin) + (6,) * d)
    exact = not cfg["bn_before"] or (not cfg["transposed"] and (cfg["padding"] == 0
                                                                 or cfg["padding_mode"] != "zeros"))
    return model.eval(), x, int(exact)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_conv_bn_fold_is_exact_or_refused(cfg: dict) -> None:
    model, x, expected_folds = build(cfg)
    result = fold_torch(model, example_inputs=x)
    assert len(result.folded) == expected_folds, (cfg, result.skipped)
    assert len(result.folded) + len(result.skipped) == 1
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules()) == 1 - expected_folds
    with torch.no_grad():
        expected = model(x)
        ref64 = model.double()(x.double())
        model.float()
        got = result.model(x)
    tol = Tolerance()
    assert tol.compare(got, expected).passed, (cfg, tol.compare(got, expected))
    assert tol.compare(got, ref64).passed, (cfg, tol.compare(got, ref64))
