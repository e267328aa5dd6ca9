"""Behaviour probes: check in float64 on a random input that a module computes what bnfold assumes it does.

Structure says what a module might be; a probe confirms it before bnfold relies on it:

* :func:`norm_ranks`: the input ranks at which a batch-norm-like module computes
  ``post(scale * x + shift)`` (see :mod:`.kinds`);
* :func:`output_foldable`: a Conv/Linear subclass with a forward of its own (timm's ``Conv2dSame``
  pads, then convolves) whose output channel ``o`` depends on ``weight[o]`` and ``bias[o]`` only
  linearly, so that ``layer(W' = s W, b' = s b + t)(x) == s * layer(x) + t``: an output-side fold
  into it is exact.

Probes run in float64 on copies, to 1e-9 relative; they never touch the module itself. Tracing
patches ``nn.Module.__call__``, so probes must run before a trace (:func:`bnfold.fold_torch.trace.trace`
runs them for every module first).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

_PROBE_RANKS = (2, 3, 4, 5)
_PROBE_RTOL = 1e-9  # float64: a module computing the assumed map differs by rounding only
_SIZES = (9, 16)  # spatial sizes tried for a convolution's probe input


def _close(got: object, want: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and bool(torch.allclose(got, want, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * float(want.abs().max()))))


def _detached(value: object) -> torch.Tensor | None:
    return value.detach() if isinstance(value, torch.Tensor) else None


def norm_ranks(mod: nn.Module, post: tuple[str, ...]) -> frozenset[int]:
    """The input ranks at which ``mod`` (in eval mode) computes ``post(bn(x))``, checked in float64."""
    stats = {n: _detached(getattr(mod, n, None)) for n in ("weight", "bias", "running_mean", "running_var")}
    mean, var = stats["running_mean"], stats["running_var"]
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor) or mean.dim() != 1:
        return frozenset()
    try:
        probe = copy.deepcopy(mod).double().eval()
    except Exception:
        return frozenset()
    gamma, beta = stats["weight"], stats["bias"]
    scale = (var.double() + float(mod.eps)).rsqrt()  # type: ignore[arg-type]
    if gamma is not None:
        scale = scale * gamma.double()
    shift = -mean.double() * scale
    if beta is not None:
        shift = shift + beta.double()
    generator = torch.Generator().manual_seed(0)
    accepted = set()
    for rank in _PROBE_RANKS:
        x = torch.randn((2, mean.shape[0], *(3,) * (rank - 2)), generator=generator, dtype=torch.float64)
        view = (1, -1) + (1,) * (rank - 2)
        want = x * scale.view(view) + shift.view(view)
        try:
            with torch.no_grad():
                for name in post:
                    want = probe._modules[name](want)  # type: ignore[misc]
                got = probe(x)
        except Exception:
            continue
        if _close(got, want):
            accepted.add(rank)
    return frozenset(accepted)


_foldable: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def output_foldable(layer: nn.Module) -> bool:
    """Whether an output-side fold into ``layer`` (a Conv/ConvTranspose/Linear subclass) is exact (see above)."""
    if layer not in _foldable:
        _foldable[layer] = _output_probe(layer)
    return _foldable[layer]


def _output_probe(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return False
    try:
        base = copy.deepcopy(layer).double().eval()
        scaled = copy.deepcopy(base)
    except Exception:
        return False
    linear = isinstance(layer, nn.Linear)
    transposed = bool(getattr(layer, "transposed", False))
    out = int(layer.out_features if linear else layer.out_channels)  # type: ignore[arg-type]
    cin = int(layer.in_features if linear else layer.in_channels)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    s = torch.rand(out, generator=generator, dtype=torch.float64) + 0.5
    t = torch.randn(out, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        w: torch.Tensor = scaled.weight  # type: ignore[assignment]
        groups = int(getattr(layer, "groups", 1))
        if transposed:  # (in, out/g, k...): output channel o = g * (out/g) + j
            grouped = w.view(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
            grouped.mul_(s.view(groups, 1, -1, *(1,) * (w.dim() - 2)))
        else:
            w.mul_(s.view(-1, *(1,) * (w.dim() - 1)))
        bias = scaled.bias if isinstance(scaled.bias, torch.Tensor) else None
        if bias is None:
            scaled.bias = nn.Parameter(t.clone())  # type: ignore[assignment]
        else:
            bias.mul_(s).add_(t)
    sizes = [()] if linear else [(n,) * (weight.dim() - 2) for n in _SIZES]
    for size in sizes:
        x = torch.randn((2, cin, *size), generator=generator, dtype=torch.float64)
        try:
            with torch.no_grad():
                y, got = base(x), scaled(x)
        except Exception:
            continue
        view = (-1,) if linear else (-1, *(1,) * (y.dim() - 2))
        return _close(got, y * s.view(view) + t.view(view))
    return False
