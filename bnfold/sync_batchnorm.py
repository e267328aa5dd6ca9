"""Synchronized batch norm for data-parallel training, on the GPU and on the CPU.

With ``W`` data-parallel processes each holding a local batch ``x_r`` of ``n_r`` values per
channel, synchronized batch norm normalizes every local batch with the statistics of the global
batch::

    n = sum_r n_r,   mean = sum_r sum(x_r) / n,   var = sum_r sum(x_r**2) / n - mean**2

and updates the running statistics with ``mean`` and the unbiased ``var * n / (n - 1)``, exactly
as one process seeing the whole global batch would. Without it every process normalizes, and
accumulates the running statistics that bnfold later folds, from its own smaller batch.

On GPUs this is :class:`torch.nn.SyncBatchNorm`, PyTorch's, used as it is. PyTorch's refuses CPU
tensors ("SyncBatchNorm expected input tensor to be on GPU"; its kernels ``batch_norm_stats`` and
friends have no CPU implementation, and DDP refuses it in a CPU module), so for CPU training with
gloo :class:`CpuSyncBatchNorm` does the same arithmetic with PyTorch's distributed autograd: the
per-channel sums, sums of squares and counts go through one float64 ``all_reduce`` whose
backward all-reduces the gradient (what :mod:`torch.distributed.nn.functional`, now deprecated,
did), so once DDP averages the parameter gradients they equal those of one process on the
global batch (tests/test_distributed.py checks statistics, outputs and updated weights).

:func:`convert` swaps every batch norm of a model for one (remembering the original class) and
:func:`revert` swaps them back, state copied both ways: the two have the same parameters and
buffers, so a checkpoint of either folds alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor,  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SumOverRanks.apply(grad, ctx.group), None  # type: ignore[attr-defined]


class CpuSyncBatchNorm(_BatchNorm):
    """Batch norm that synchronizes CPU tensors over the process group (gloo); see the module docstring.

    Outside a process group of two or more, or in eval mode, it is plain batch norm.
    """

    plain_type: type[_BatchNorm] = nn.BatchNorm2d  # the class :func:`revert` gives back

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) < 2:
            return super().forward(input)
        if input.device.type != "cpu":
            raise ValueError(f"CpuSyncBatchNorm got a {input.device.type} tensor; convert with device='cuda' to use "
                             "torch.nn.SyncBatchNorm")
        self._check_input_dim(input)
        return self._sync(input, group)

    def _sync(self, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
                factor = 1.0 / float(self.num_batches_tracked)
        channels = x.shape[1]
        dims = [0, *range(2, x.ndim)]
        wide = x.to(torch.float64)  # sums in float64: the one-pass variance then loses nothing a float32 shows
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_full((1,), x.numel() // channels)])
        total = _SumOverRanks.apply(local, group)
        count = total[2 * channels].detach()
        if float(count) < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} in all")
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = (1, channels, *([1] * (x.ndim - 2)))
        y = ((wide - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


SYNCED = (nn.SyncBatchNorm, CpuSyncBatchNorm)  # the classes convert() produces


def convert(model: nn.Module, device: torch.device | str = "cpu",
            process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``model`` with every plain batch norm replaced by a synchronized one, state copied:
    :class:`torch.nn.SyncBatchNorm` for ``device`` cuda, :class:`CpuSyncBatchNorm` for cpu.

    Replaces in place and returns ``model`` (or the new module when ``model`` is itself a batch norm).
    """
    kind = CpuSyncBatchNorm if torch.device(device).type == "cpu" else nn.SyncBatchNorm
    if isinstance(model, _BatchNorm) and not isinstance(model, SYNCED):
        sync = kind(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats,
                    process_group)
        sync.plain_type = type(model)  # type: ignore[assignment,misc]  # also on torch's class: for revert()
        sync.load_state_dict(model.state_dict())
        return sync.to(_device(model)).train(model.training)
    for name, child in model.named_children():
        model.add_module(name, convert(child, device, process_group))
    return model


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: every synchronized batch norm back to its plain class, state copied
    (a :class:`torch.nn.SyncBatchNorm` that :func:`convert` did not make records no class: ``BatchNorm2d``)."""
    if isinstance(model, SYNCED):
        plain_type = getattr(model, "plain_type", nn.BatchNorm2d)
        plain = plain_type(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        plain.load_state_dict(model.state_dict())
        return plain.to(_device(model)).train(model.training)
    for name, child in model.named_children():
        model.add_module(name, revert(child))
    return model


def is_synced(model: nn.Module) -> bool:
    """Whether ``model`` holds a synchronized batch norm."""
    return any(isinstance(m, SYNCED) for m in model.modules())


def _device(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")
