"""Layers bnfold's own models use besides the standard ``torch.nn`` ones.

:class:`InputNorm` is the input normalization computed on the training split and stored in
the model, so a served model needs no client-side preprocessing. It is a fixed per-channel
affine map on axis 1, ``y = x * scale + shift`` (the same form as an inference-time batch
norm), and the PyTorch rewriter folds it into the following layer where that is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputNorm(nn.Module):
    """``y[:, c] = x[:, c] * scale[c] + shift[c]`` with fixed buffers (not trained).

    Build it from per-channel training statistics with :meth:`from_stats`:
    ``scale = 1 / std``, ``shift = -mean / std``.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("shift", torch.zeros(num_features))

    @classmethod
    def from_stats(cls, mean: Sequence[float], std: Sequence[float]) -> InputNorm:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        layer = cls(len(mean))
        std_t = torch.as_tensor(std, dtype=torch.float64)
        if torch.any(std_t <= 0):
            raise ValueError(f"std must be > 0 for every channel, got {std_t.tolist()}")
        layer.scale.copy_((1.0 / std_t).float())
        layer.shift.copy_((-torch.as_tensor(mean, dtype=torch.float64) / std_t).float())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
