"""A layer folded for one input rank that computes the original, unfolded ops at every other rank.

Some folds are exact at one input rank only. A ``BatchNorm1d`` normalizes axis 1; a ``Linear``
mixes the last axis. For a 2-D input ``x`` of shape ``(N, C)`` they are the same axis and

    bn(linear(x)) = s * (x W^T + b) + t = x (s W)^T + (s b + t)          (s, t: per channel, see arith)

but for a 3-D input ``(N, C, L)`` the batch norm scales axis 1 while the Linear acts on axis 2, so no
single folded Linear reproduces it. When nothing fixes the rank before folding, the rewrite puts a
:class:`RankDispatch` where the layer was:

    dispatch(x) = folded(x)                            if x.dim() == rank
                = after(layer(before(x)))              otherwise

``folded`` is the layer with the norms folded in; ``layer`` is a copy of the original layer whose
weight and bias are buffers (not trainable), and ``before``/``after`` are the folded norms as plain
constants (a batch norm as ``F.batch_norm(training=False)`` with its own running statistics and eps,
an :class:`~bnfold.layers.InputNorm` as ``x * scale + shift``), applied in graph order. So the model
equals the original at every rank, bit for bit off the folded rank. Neither path holds a batch norm
module, so a second fold finds nothing left to fold. Further norms folding into the same layer
(chains) are folded into ``folded`` and appended to ``before``/``after``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class NormStep(nn.Module):
    """One folded norm as constants: a batch norm in eval mode, or ``x * scale + shift`` on axis 1."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], eps: float | None) -> None:
        super().__init__()
        self.eps = eps  # None: an InputNorm (scale/shift); else a batch norm
        for name, t in tensors.items():
            self.register_buffer(name, None if t is None else t.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        if self.eps is None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * b["scale"].view(shape) + b["shift"].view(shape)  # type: ignore[union-attr]
        return F.batch_norm(x, b["running_mean"], b["running_var"], b["weight"], b["bias"],
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return "x * scale + shift" if self.eps is None else f"batch_norm(eps={self.eps})"


def frozen_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are buffers (same values, not trainable)."""
    copied = copy.deepcopy(layer)
    for name, param in list(copied.named_parameters(recurse=False)):
        del copied._parameters[name]
        copied.register_buffer(name, param.detach().clone())
    return copied


class RankDispatch(nn.Module):
    """``folded(x)`` when ``x.dim() == rank``, else the original ``after(layer(before(x)))``.

    Called exactly like the layer it replaces (positional or ``input=`` keyword, extra arguments such
    as ConvTranspose's ``output_size`` passed to both paths).
    """

    def __init__(self, folded: nn.Module, original: nn.Module, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.folded = folded
        self.layer = frozen_copy(original)
        self.before = nn.ModuleList()  # norms applied to the input, first one first
        self.after = nn.ModuleList()  # norms applied to the output, first one first

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if input.dim() == self.rank:
            return self.folded(input, *args, **kwargs)
        return self.unfolded(input, *args, **kwargs)

    def unfolded(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What the original model computed: the norms and the layer with its original weights."""
        for step in self.before:
            input = step(input)
        out = self.layer(input, *args, **kwargs)
        for step in self.after:
            out = step(out)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
