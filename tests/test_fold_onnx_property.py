"""Property: for any Conv/ConvTranspose configuration, folding a BN next to it either gives the same
function (float32 under onnxruntime, and float64 to rounding against the numpy reference) or is
refused exactly when the algebra says it is not exact (BN before a zero-padded conv or before a
transposed conv with a nonzero shift)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_fold_onnx import Net, check_fold, reference

from bnfold.fold_onnx import fold_onnx
from bnfold.tolerance import Tolerance


@dataclass(frozen=True)
class ConvConfig:
    dims: int
    transposed: bool
    groups: int
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    output_padding: tuple[int, ...]
    bias: bool
    bn_before: bool
    zero_shift: bool  # BN with beta = mean = 0: an exact input-side fold even where padding is nonzero

    @property
    def expect_fold(self) -> bool:
        if not self.bn_before or self.zero_shift:
            return True
        return not self.transposed and not any(self.pads)


@st.composite
def conv_configs(draw: st.DrawFn) -> ConvConfig:
    dims = draw(st.integers(1, 3))
    per_dim = st.lists(st.integers(1, 2), min_size=dims, max_size=dims).map(tuple)
    groups = draw(st.integers(1, 3))
    kernel = draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims).map(tuple))
    strides, dilations = draw(per_dim), draw(per_dim)
    transposed = draw(st.booleans())
    # pads smaller than the effective kernel keep every output size positive for both kinds
    pads = tuple(draw(st.integers(0, min(1, (k - 1) * d))) for k, d in zip(kernel * 2, dilations * 2, strict=True))
    out_pad = tuple(draw(st.integers(0, min(s, d) - 1)) for s, d in zip(strides, dilations, strict=True))
    return ConvConfig(
        dims=dims, transposed=transposed, groups=groups,
        c_in=groups * draw(st.integers(1, 2)), c_out=groups * draw(st.integers(1, 2)),
        kernel=kernel, strides=strides, dilations=dilations, pads=pads,
        output_padding=out_pad if transposed else (0,) * dims,
        bias=draw(st.booleans()), bn_before=draw(st.booleans()), zero_shift=draw(st.booleans()),
    )


def build(cfg: ConvConfig, dtype: type) -> tuple[Net, onnx.ModelProto]:
    n = Net(seed=hash(cfg) % 2**32, dtype=dtype)
    attrs = {"group": cfg.groups, "kernel_shape": list(cfg.kernel), "strides": list(cfg.strides),
             "dilations": list(cfg.dilations), "pads": list(cfg.pads)}
    if cfg.transposed:
        attrs["output_padding"] = list(cfg.output_padding)
        w_shape = (cfg.c_in, cfg.c_out // cfg.groups, *cfg.kernel)
    else:
        w_shape = (cfg.c_out, cfg.c_in // cfg.groups, *cfg.kernel)
    x = "x"
    if cfg.bn_before:
        x = n.bn(x, cfg.c_in, "xb")
        bn_params = n.inits[-4:]
    inputs = [x, n.rand("w", *w_shape)] + ([n.rand("b", cfg.c_out)] if cfg.bias else [])
    y = n.node("ConvTranspose" if cfg.transposed else "Conv", inputs, "y", **attrs)
    if not cfg.bn_before:
        y = n.bn(y, cfg.c_out, "z")
        bn_params = n.inits[-4:]
    if cfg.zero_shift:
        for t in bn_params[1:3]:  # B and mean
            t.CopyFrom(numpy_helper.from_array(np.zeros(t.dims, n.dtype), t.name))
    size = max(1 + (k - 1) * d for k, d in zip(cfg.kernel, cfg.dilations, strict=True)) + 2
    return n, n.model({"x": (2, cfg.c_in, *([size] * cfg.dims))}, [y])


@settings(max_examples=150, deadline=None)
@given(conv_configs())
def test_conv_bn_fold_is_exact_or_refused(cfg: ConvConfig) -> None:
    n, model = build(cfg, np.float32)
    if cfg.expect_fold:
        result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=1)
        assert result.folded[0].side == ("input" if cfg.bn_before else "output")
    else:
        result = fold_onnx(model)
        assert result.folded == [] and len(result.skipped) == 1
        assert "not exact" in result.skipped[0].reason
        assert result.model.SerializeToString() == model.SerializeToString()


@settings(max_examples=80, deadline=None)
@given(conv_configs())
def test_conv_bn_fold_is_exact_in_float64(cfg: ConvConfig) -> None:
    """In float64 the folded weights carry no float32 rounding: agreement to ~1e-12 of the scale."""
    n, model = build(cfg, np.float64)
    result = fold_onnx(model)
    assert len(result.folded) == int(cfg.expect_fold)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = n.feeds(model)
    for got, want in zip(reference(result.model, feeds), reference(model, feeds), strict=True):
        cmp = Tolerance(atol=1e-12, rtol=1e-12).compare(got, want)
        assert cmp.passed, cmp
