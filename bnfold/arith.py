"""The fold arithmetic, written once: pure float64 functions over numpy arrays.

Batch normalization at inference is a per-channel affine map::

    bn(x)[c] = gamma[c] * (x[c] - mean[c]) / sqrt(var[c] + eps) + beta[c]
             = scale[c] * x[c] + shift[c]
    scale = gamma / sqrt(var + eps)          shift = beta - mean * scale

A linear layer ``y[o] = sum_i W[o, i, k...] * x[i, ...] + b[o]`` (Linear, Gemm, MatMul, Conv,
ConvTranspose) composes with it on either side.

*BN after the layer* (``output`` side)::

    bn(layer(x))[o] = scale[o] * (W x)[o] + scale[o] * b[o] + shift[o]
    W'[o, ...] = scale[o] * W[o, ...]        b' = scale * b + shift

*BN before the layer* (``input`` side)::

    layer(bn(x))[o] = sum_i W[o, i, k] * (scale[i] x[i] + shift[i]) + b[o]
    W'[o, i, k] = W[o, i, k] * scale[i]      b'[o] = b[o] + sum_{i, k} W[o, i, k] * shift[i]

The input-side bias identity assumes every output position sees every kernel tap of a real
(not padded) input value. That holds for Linear/Gemm/MatMul and for a convolution without
zero padding, or with reflect/replicate/circular padding (those pad with copies of bn(x), so
they commute with a per-channel affine map). It also holds whenever ``shift == 0``. It fails for
zero padding and for transposed convolutions, where border outputs see fewer taps;
:func:`input_side_exactness` states which case applies.

Weight layouts are described by two parameters instead of one function per layer type:

* ``axis``: the weight axis that holds the channels the BN acts on (output channels for the
  output side, input channels for the input side);
* ``groups``: for grouped layouts where that axis holds only ``C / groups`` channels and the group
  index runs along axis 0 (ConvTranspose on the output side: weight ``(C_in, C_out/g, k...)``;
  Conv on the input side: weight ``(C_out, C_in/g, k...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``x -> scale * x + shift`` (float64)."""

    scale: F64
    shift: F64

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def repeat_channels(affine: Affine, block: int) -> Affine:
    """The affine map on ``flatten(x, 1)`` of a per-channel map on ``x`` of shape ``(N, C, *spatial)``.

    Flattening is channel-major, so channel ``c`` becomes the contiguous features
    ``[c * block, (c + 1) * block)`` with ``block = prod(spatial)``: each scale and shift repeats
    ``block`` times. ``block >= 1``.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return Affine(scale=np.repeat(affine.scale, block), shift=np.repeat(affine.shift, block))


def broadcast_channel(affine: Affine, channels: int) -> Affine:
    """A one-channel affine map (a batch norm over a size-1 axis) as the same map on each of ``channels``.

    With one channel the map is ``x -> scale * x + shift`` on every element, whichever axis the
    layer next to it mixes, so it folds like a per-channel map whose channels are all equal.
    """
    if affine.channels != 1:
        raise ValueError(f"broadcast_channel needs a one-channel map, got {affine.channels} channels")
    return Affine(scale=np.full(channels, affine.scale[0]), shift=np.full(channels, affine.shift[0]))


def bn_affine(
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
) -> Affine:
    """Return the inference-time affine map of a batch normalization, in float64.

    Preconditions: ``mean``, ``var`` (and ``gamma``, ``beta`` when given) are 1-D with the same
    length and finite; ``var + eps > 0``. ``gamma=None`` / ``beta=None`` mean 1 and 0
    (``affine=False``). Raises ``ValueError`` naming the offending channel otherwise.
    """
    m = _vector("mean", mean)
    v = _vector("var", var)
    c = m.shape[0]
    g = np.ones(c) if gamma is None else _vector("gamma", gamma)
    b = np.zeros(c) if beta is None else _vector("beta", beta)
    for name, arr in (("var", v), ("gamma", g), ("beta", b)):
        if arr.shape[0] != c:
            raise ValueError(f"batch norm {name} has {arr.shape[0]} channels but mean has {c}")
    denom = v + float(eps)
    if np.any(denom <= 0):
        i = int(np.argmax(denom <= 0))
        raise ValueError(f"batch norm var + eps must be > 0, got {float(denom[i])!r} at channel {i}")
    scale = g / np.sqrt(denom)
    return Affine(scale=scale, shift=b - m * scale)


def expand_channels(vec: F64, weight_shape: tuple[int, ...], axis: int, groups: int = 1) -> F64:
    """Arrange a per-channel vector so that it broadcasts against a weight of ``weight_shape``.

    ``weight_shape[axis] * groups == len(vec)`` is required. With ``groups > 1`` and
    ``weight_shape[axis] != len(vec)`` the channel index is ``group * weight_shape[axis] + j``,
    where the group of an entry is its index along axis 0 divided by ``weight_shape[0] / groups``.
    """
    ndim = len(weight_shape)
    axis = axis % ndim
    n = vec.shape[0]
    if weight_shape[axis] == n:
        shape = [1] * ndim
        shape[axis] = n
        return vec.reshape(shape)
    if groups < 1 or weight_shape[axis] * groups != n or axis != 1 or weight_shape[0] % groups:
        raise ValueError(
            f"cannot map {n} channels onto weight axis {axis} of shape {tuple(weight_shape)} "
            f"with groups={groups}"
        )
    per_group = weight_shape[0] // groups
    group_of_row = np.arange(weight_shape[0]) // per_group
    index = group_of_row[:, None] * weight_shape[1] + np.arange(weight_shape[1])[None, :]
    return vec[index].reshape(weight_shape[:2] + (1,) * (ndim - 2))


def fold_output_side(
    weight: ArrayLike, bias: ArrayLike | None, bn: Affine, *, axis: int = 0, groups: int = 1
) -> tuple[F64, F64]:
    """Fold ``bn`` applied to the layer's output: ``W' = scale * W`` along ``axis``, ``b' = scale*b + shift``.

    ``axis`` holds the output channels (0 for Conv/Linear/Gemm transB=1, 1 for Gemm transB=0,
    MatMul and ConvTranspose). For ConvTranspose pass ``groups``. ``bias=None`` means zero.
    Returns float64 arrays; the caller casts back to the layer's dtype.
    """
    w = np.asarray(weight, dtype=np.float64)
    b = np.zeros(bn.channels) if bias is None else _vector("bias", bias)
    if b.shape[0] != bn.channels:
        raise ValueError(f"layer has {b.shape[0]} output channels but batch norm has {bn.channels}")
    w_new = w * expand_channels(bn.scale, w.shape, axis, groups)
    return w_new, bn.scale * b + bn.shift


def fold_input_side(
    weight: ArrayLike,
    bias: ArrayLike | None,
    bn: Affine,
    *,
    axis: int = 1,
    out_axis: int = 0,
    groups: int = 1,
    out_channels: int | None = None,
) -> tuple[F64, F64]:
    """Fold ``bn`` applied to the layer's input: ``W' = W * scale`` along ``axis``, ``b' = b + sum W*shift``.

    ``axis`` holds the input channels (1 for Conv/Linear/Gemm transB=1, 0 for Gemm transB=0,
    MatMul and ConvTranspose); ``out_axis`` holds the output channels. For a grouped Conv pass
    ``groups`` (the weight's input axis holds ``C_in / groups``). When the output axis is
    grouped (ConvTranspose, ``out_axis=1``), pass ``groups`` and ``out_channels``.
    Precondition (the caller's check): :func:`input_side_exactness` returned ``None``.
    """
    w = np.asarray(weight, dtype=np.float64)
    ndim = w.ndim
    axis, out_axis = axis % ndim, out_axis % ndim
    w_new = w * expand_channels(bn.scale, w.shape, axis, groups)
    contrib = w * expand_channels(bn.shift, w.shape, axis, groups)
    # Sum every axis except the first two, then reduce the non-output one of those two.
    m = contrib.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) if ndim > 2 else contrib
    if ndim == 1:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {w.shape}")
    if out_axis == 0:
        add = m.sum(axis=1)
    elif out_channels is not None and out_channels != w.shape[1]:
        per_group = w.shape[0] // groups
        add = np.concatenate([m[g * per_group : (g + 1) * per_group].sum(axis=0) for g in range(groups)])
    else:
        add = m.sum(axis=0)
    b = np.zeros(add.shape[0]) if bias is None else _vector("bias", bias)
    if b.shape != add.shape:
        raise ValueError(f"layer bias has {b.shape[0]} entries but the layer has {add.shape[0]} outputs")
    return w_new, b + add


def input_side_exactness(
    bn: Affine, *, pads: tuple[int, ...] = (), padding_mode: str = "zeros", transposed: bool = False
) -> str | None:
    """Return ``None`` when folding ``bn`` into the *following* layer is exact, else the reason.

    Exact when the shift is zero, or for a non-transposed layer whose padding is all zero or is
    not zero-valued (reflect/replicate/circular copy bn(x) values into the border).
    """
    if not np.any(bn.shift):
        return None
    if transposed:
        return (
            "folding a batch norm into the following transposed convolution is not exact: border "
            "outputs see fewer kernel taps, so the shift cannot move into the bias"
        )
    if any(int(p) != 0 for p in pads) and padding_mode in ("zeros", "constant"):
        return (
            f"folding a batch norm into the following convolution is not exact with zero padding "
            f"{tuple(int(p) for p in pads)}: the padded border would see the shift; "
            "use padding=0 or a reflect/replicate/circular padding_mode"
        )
    return None


def _vector(name: str, value: ArrayLike) -> F64:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"batch norm {name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        i = int(np.argmax(~np.isfinite(arr)))
        raise ValueError(f"batch norm {name} must be finite, got {float(arr[i])!r} at channel {i}")
    return arr


def affine_kernel(affine: Affine, in_per_group: int, groups: int, dims: int) -> tuple[F64, F64]:
    """A per-channel map ``x -> scale * x + shift`` as a 1x..x1 convolution (weight, bias) with ``groups``.

    Output channel ``o`` reads input channel ``o``, which is index ``o % in_per_group`` within its
    group. Preconditions: as many output as input channels (``affine.channels == in_per_group * groups``).
    """
    c = affine.channels
    if in_per_group * groups != c:
        raise ValueError(f"an identity branch needs as many output as input channels: {c} != "
                         f"{in_per_group} x {groups} groups")
    weight = np.zeros((c, in_per_group) + (1,) * dims)
    weight[(np.arange(c), np.arange(c) % in_per_group) + (0,) * dims] = affine.scale
    return weight, affine.shift.copy()


def embed_kernel(weight: ArrayLike, size: tuple[int, ...], offset: tuple[int, ...]) -> F64:
    """``weight`` (``(out, in/g, k...)``) placed in a zero kernel of spatial ``size`` at ``offset``.

    A convolution with the embedded kernel and padding ``P`` equals the original with padding
    ``P - offset * dilation``: the extra taps have zero weight, so what they read (padding
    included) does not matter. Parallel branches of different kernel sizes over the same input
    then sum into one convolution: ``sum_i conv(x, W_i) + b_i = conv(x, sum_i embed(W_i)) + sum_i b_i``.
    """
    w = np.asarray(weight, dtype=np.float64)
    out = np.zeros(w.shape[:2] + tuple(size))
    index = (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offset, w.shape[2:], strict=True)))
    out[index] = w
    return out
