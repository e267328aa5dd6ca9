"""The fold arithmetic against direct float64 evaluation of layer∘BN and BN∘layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold.arith import Affine, bn_affine, expand_channels, fold_input_side, fold_output_side, input_side_exactness

rng = np.random.default_rng(0)


def random_bn(c: int) -> Affine:
    return bn_affine(
        mean=rng.normal(size=c), var=rng.uniform(0.1, 3.0, size=c), eps=1e-3,
        gamma=rng.normal(size=c), beta=rng.normal(size=c),
    )


def apply_bn(x: torch.Tensor, bn: Affine) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.from_numpy(bn.scale).view(shape) + torch.from_numpy(bn.shift).view(shape)


def test_bn_affine_matches_formula() -> None:
    mean, var, gamma, beta = np.array([1.0, -2.0]), np.array([4.0, 0.25]), np.array([2.0, 3.0]), np.array([0.5, 0.0])
    bn = bn_affine(mean, var, 0.0, gamma, beta)
    np.testing.assert_allclose(bn.scale, [1.0, 6.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(bn.shift, [-0.5, 12.0], rtol=0, atol=1e-15)


def test_bn_affine_without_affine_params() -> None:
    bn = bn_affine([1.0], [3.0], 1.0)
    np.testing.assert_allclose(bn.scale, [0.5])
    np.testing.assert_allclose(bn.shift, [-0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"mean": [0.0], "var": [-1.0], "eps": 0.5}, "var \\+ eps must be > 0", id="negative-variance"),
        pytest.param({"mean": [0.0], "var": [np.nan], "eps": 0.5}, "var must be finite", id="nan-variance"),
        pytest.param({"mean": [0.0, 1.0], "var": [1.0], "eps": 0.5}, "var has 1 channels but mean has 2", id="length"),
        pytest.param({"mean": [[0.0]], "var": [[1.0]], "eps": 0.5}, "must be 1-D", id="not-1d"),
    ],
)
def test_bn_affine_rejects_bad_statistics(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bn_affine(**kwargs)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_output_side_conv(dims: int, groups: int) -> None:
    conv = getattr(F, f"conv{dims}d")
    w = torch.from_numpy(rng.normal(size=(6, 12 // groups) + (3,) * dims))
    b = torch.from_numpy(rng.normal(size=6))
    x = torch.from_numpy(rng.normal(size=(2, 12) + (7,) * dims))
    bn = random_bn(6)
    w2, b2 = fold_output_side(w.numpy(), b.numpy(), bn)
    expected = apply_bn(conv(x, w, b, padding=1, groups=groups), bn)
    got = conv(x, torch.from_numpy(w2), torch.from_numpy(b2), padding=1, groups=groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_output_side_conv_transpose(groups: int) -> None:
    w = torch.from_numpy(rng.normal(size=(8, 12 // groups, 3, 3)))  # (in, out/g, k, k)
    x = torch.from_numpy(rng.normal(size=(2, 8, 5, 5)))
    bn = random_bn(12)
    w2, b2 = fold_output_side(w.numpy(), None, bn, axis=1, groups=groups)
    expected = apply_bn(F.conv_transpose2d(x, w, None, stride=2, groups=groups), bn)
    got = F.conv_transpose2d(x, torch.from_numpy(w2), torch.from_numpy(b2), stride=2, groups=groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3, 12])
def test_input_side_conv_without_padding(groups: int) -> None:
    w = torch.from_numpy(rng.normal(size=(24, 12 // groups, 3, 3)))
    b = torch.from_numpy(rng.normal(size=24))
    x = torch.from_numpy(rng.normal(size=(2, 12, 6, 6)))
    bn = random_bn(12)
    assert input_side_exactness(bn, pads=(0, 0)) is None
    w2, b2 = fold_input_side(w.numpy(), b.numpy(), bn, axis=1, groups=groups)
    expected = F.conv2d(apply_bn(x, bn), w, b, stride=2, groups=groups)
    got = F.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2), stride=2, groups=groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_input_side_conv_with_reflect_padding_is_exact() -> None:
    w = torch.from_numpy(rng.normal(size=(5, 4, 3, 3)))
    x = torch.from_numpy(rng.normal(size=(2, 4, 6, 6)))
    bn = random_bn(4)
    assert input_side_exactness(bn, pads=(1, 1), padding_mode="reflect") is None
    w2, b2 = fold_input_side(w.numpy(), None, bn)
    expected = F.conv2d(F.pad(apply_bn(x, bn), (1, 1, 1, 1), mode="reflect"), w)
    got = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), torch.from_numpy(w2), torch.from_numpy(b2))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_input_side_linear_and_matmul_layouts() -> None:
    w = rng.normal(size=(7, 5))  # Linear: (out, in)
    b = rng.normal(size=7)
    x = rng.normal(size=(3, 5))
    bn = random_bn(5)
    w2, b2 = fold_input_side(w, b, bn)
    np.testing.assert_allclose(x @ w2.T + b2, (x * bn.scale + bn.shift) @ w.T + b, rtol=0, atol=1e-12)
    # MatMul / Gemm transB=0 layout: (in, out)
    w3, b3 = fold_input_side(w.T, b, bn, axis=0, out_axis=1)
    np.testing.assert_allclose(x @ w3 + b3, (x * bn.scale + bn.shift) @ w.T + b, rtol=0, atol=1e-12)


def test_input_side_conv_transpose_scale_only() -> None:
    """With shift == 0 the transposed case is exact (scale only)."""
    w = torch.from_numpy(rng.normal(size=(6, 2, 3, 3)))  # (in, out/g), groups=3 -> out=6
    x = torch.from_numpy(rng.normal(size=(1, 6, 4, 4)))
    bn = bn_affine(np.zeros(6), rng.uniform(0.5, 2, 6), 1e-5, rng.normal(size=6), np.zeros(6))
    assert input_side_exactness(bn, transposed=True) is None
    w2, b2 = fold_input_side(w.numpy(), None, bn, axis=0, out_axis=1, groups=3, out_channels=6)
    expected = F.conv_transpose2d(apply_bn(x, bn), w, groups=3, stride=2)
    got = F.conv_transpose2d(x, torch.from_numpy(w2), torch.from_numpy(b2), groups=3, stride=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"pads": (1, 1)}, "zero padding", id="zero-padding"),
        pytest.param({"transposed": True}, "transposed", id="transposed"),
    ],
)
def test_input_side_exactness_refusals(kwargs: dict, match: str) -> None:
    reason = input_side_exactness(random_bn(3), **kwargs)
    assert reason is not None and match in reason


def test_expand_channels_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="cannot map 5 channels"):
        expand_channels(np.ones(5), (4, 3, 3, 3), 1, groups=2)
