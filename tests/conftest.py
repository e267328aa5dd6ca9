"""Shared helpers for the PyTorch fold tests (exposed as session fixtures)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.layers import InputNorm
from bnfold.result import FoldResult
from bnfold.tolerance import Tolerance


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm / InputNorm non-trivial statistics: mean != 0, var != 1, gamma != 1, beta != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "keep_stats", False):  # a test set these statistics on purpose
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or _has_stats(m):  # incl. frozen batch norms
                c = m.running_mean.shape[0] if _has_stats(m) else m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 1.5 + 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) * 2.7 + 0.3)
                if getattr(m, "affine", True) and isinstance(getattr(m, "weight", None), torch.Tensor):
                    sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (torch.rand(c, generator=g) * 1.5 + 0.5))
                    m.bias.copy_(torch.randn(c, generator=g))
            elif isinstance(m, InputNorm):
                m.scale.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                m.shift.copy_(torch.randn(m.num_features, generator=g))
    return model


def _has_stats(m: nn.Module) -> bool:
    """A callable module holding batch-norm statistics: not a rank dispatch's unfolded path (NormStep), nor
    a plain holder of a folded norm's tensors (no forward)."""
    from bnfold.fold_torch.guard import NormStep

    if isinstance(m, (torch.jit.ScriptModule, NormStep)):
        return False
    return (isinstance(m._buffers.get("running_mean"), torch.Tensor)
            and type(m).forward is not nn.Module.forward)


def norms_left(model: nn.Module) -> int:
    """Batch norm (of any kind: anything holding a ``running_mean`` buffer) / InputNorm modules plus
    functional batch norm calls still in ``model``."""
    n = sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, InputNorm)) or _has_stats(m) for m in model.modules())
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    if not graphs:
        try:
            from bnfold.fold_torch.trace import trace  # batch-norm kinds stay leaves (counted above)

            graphs = [trace(model)]
        except Exception:
            graphs = []
    for gm in graphs:
        n += sum(node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)
                 for node in gm.graph.nodes)
    return n


def run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's output; several outputs are flattened and concatenated."""
    with torch.no_grad():
        out = model(*inputs)
    if isinstance(out, (tuple, list)):
        out = torch.cat([t.flatten() for t in out])
    return out


def check_fold(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    folded: int,
    left: int,
    tol: Tolerance | None = None,
    fold: Callable[..., FoldResult[Any]] | None = None,
    **options: Any,
) -> FoldResult[nn.Module]:
    """Fold ``model`` and assert the four things every fold test checks.

    1. how many norms were folded; 2. how many are left in the result; 3. the result equals the
    original (same dtype) and a float64 copy of the original within ``tol`` (Tolerance defaults);
    4. the input model is unchanged and the result is in eval mode, every norm reported once.
    """
    from bnfold.fold_torch import fold_torch

    tol = tol or Tolerance()
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    before = copy.deepcopy(model.state_dict())
    training = [m.training for m in model.modules()]
    result = (fold or fold_torch)(model, **options)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "fold_torch modified the input model"
    assert [m.training for m in model.modules()] == training

    assert len(result.folded) == folded, (result.folded, result.skipped)
    assert norms_left(result.model) == left, result.model
    assert not any(m.training for m in result.model.modules())
    names = [f.bn for f in result.folded] + [s.bn for s in result.skipped]
    assert len(names) == len(set(names)), names

    reference = copy.deepcopy(model).eval()
    expected = run(reference, inputs)
    got = run(result.model, inputs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    same = tol.compare(got, expected)
    assert same.passed, f"folded vs original: {same}"
    if expected.dtype == torch.float32:
        ref64 = run(reference.double(), tuple(t.double() if t.is_floating_point() else t for t in inputs))
        vs64 = tol.compare(got, ref64)
        assert vs64.passed, f"folded vs float64 reference: {vs64}"
    return result


@pytest.fixture(scope="session")
def fold_check() -> Callable[..., FoldResult[nn.Module]]:
    return check_fold


@pytest.fixture(scope="session")
def randomize() -> Callable[..., nn.Module]:
    return randomize_norms
