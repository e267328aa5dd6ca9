"""The batch-norm modules bnfold folds, in one table: how each is recognized and what it does after normalizing.

At inference every kind computes ``post(bn(x))`` with ``bn`` the per-channel affine map of
:func:`bnfold.arith.bn_affine` (``running_mean``, ``running_var``, ``eps``, ``weight``, ``bias`` read
from the module) and ``post`` the module's own children applied after it, in order (timm's BN+act
layers: ``drop``, then ``act``). Folding moves ``bn`` into the layer before it and leaves ``post`` in
place: the module is replaced by a :class:`PostOp` holding the same children under the same names.

================== ===================================================================== ==============
kind               recognized by                                                         post-op
================== ===================================================================== ==============
batchnorm          ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm*`` and   none
                   subclasses that keep torch's forward
batchnorm+act      a ``_BatchNorm`` subclass with a forward of its own whose children    drop, act
                   are among ``drop`` and ``act`` (timm ``BatchNormAct2d``,
                   ``SyncBatchNormAct``; a subclass that only adds input checks)
frozen batchnorm   any other module with 1-D buffers ``weight``, ``bias``,                drop, act
                   ``running_mean``, ``running_var``, a number ``eps``, no parameters
                   and children among ``drop`` and ``act`` (torchvision
                   ``FrozenBatchNorm2d``, timm ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``)
================== ===================================================================== ==============

A kind recognized by structure (all but the first) must also show the behaviour: on a probe input
in float64, ``module(x)`` must equal ``post(bn(x))`` to 1e-9 relative. The ranks at which the probe
passes are the input ranks the module accepts. A module that fails the probe at every rank is not a
batch norm to bnfold: it is traced through like any other module. Functional batch norms
(``F.batch_norm``, ``torch.batch_norm``, aten batch-norm nodes) are recognized on graph nodes, in
:mod:`.norms`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.fold_torch.guard import NormStep
from bnfold.fold_torch.probe import norm_ranks

_POST_CHILDREN = ("drop", "act")  # timm's names, applied in this order after the normalization
_STAT_NAMES = ("weight", "bias", "running_mean", "running_var")
_TORCH_RANKS = {nn.BatchNorm1d: frozenset({2, 3}), nn.BatchNorm2d: frozenset({4}), nn.BatchNorm3d: frozenset({5})}


@dataclass(frozen=True)
class Kind:
    """One row of the table: a name, a structural test, and whether behaviour must be probed."""

    name: str
    matches: Callable[[nn.Module], bool]
    probed: bool


@dataclass(frozen=True)
class Recognized:
    """A module recognized as a batch norm: its kind, the ranks it accepts, and its post-op children."""

    kind: str
    ranks: frozenset[int] | None  # None: any rank >= 2
    post: tuple[str, ...]  # names of the children applied after the normalization (identities left out)


def _torch_forward(mod: nn.Module) -> bool:
    from bnfold.fold_torch.trace import has_torch_forward

    return has_torch_forward(mod)


def _children_are_post_ops(mod: nn.Module) -> bool:
    return all(name in _POST_CHILDREN for name, _ in mod.named_children())


def _is_frozen(mod: nn.Module) -> bool:
    if isinstance(mod, (_BatchNorm, NormStep)) or next(mod.parameters(recurse=False), None) is not None:
        return False  # NormStep: the unfolded path of bnfold's own rank dispatch, never traced into
    buffers = dict(mod.named_buffers(recurse=False))
    stats = [buffers.get(n) for n in _STAT_NAMES]
    if any(t is None or t.dim() != 1 or not t.is_floating_point() for t in stats):
        return False
    eps = getattr(mod, "eps", None)
    return (isinstance(eps, (int, float)) and not isinstance(eps, bool) and len({t.shape for t in stats}) == 1  # type: ignore[union-attr]
            and _children_are_post_ops(mod))


KINDS: tuple[Kind, ...] = (
    Kind("batchnorm", lambda m: isinstance(m, _BatchNorm) and _torch_forward(m), probed=False),
    Kind("batchnorm+act", lambda m: isinstance(m, _BatchNorm) and _children_are_post_ops(m), probed=True),
    Kind("frozen batchnorm", _is_frozen, probed=True),
)

_cache: weakref.WeakKeyDictionary[nn.Module, Recognized | None] = weakref.WeakKeyDictionary()


def recognize(mod: nn.Module) -> Recognized | None:
    """The kind of batch norm ``mod`` is, or ``None`` if it is none of :data:`KINDS` (see the module doc)."""
    if isinstance(mod, torch.jit.ScriptModule):
        return None  # compiled: cannot be rewritten (reported as such by fold_torch)
    if mod in _cache:
        return _cache[mod]
    found = None
    for kind in KINDS:
        if not kind.matches(mod):
            continue
        if not kind.probed:  # torch's forward: no post-op, ranks from _check_input_dim
            ranks = next((r for cls, r in _TORCH_RANKS.items() if isinstance(mod, cls)
                          and type(mod)._check_input_dim is cls._check_input_dim), None)  # type: ignore[attr-defined]
            found = Recognized(kind.name, ranks, ())
        else:
            post = tuple(n for n in _POST_CHILDREN if n in mod._modules and not _is_identity(mod._modules[n]))
            ranks = norm_ranks(mod, post)
            found = Recognized(kind.name, ranks, post) if ranks else None
        break
    _cache[mod] = found
    return found


def _is_identity(mod: nn.Module | None) -> bool:
    """True for a child that is the identity at inference (and so need not be kept as a post-op)."""
    if mod is None:
        return True
    if mod._forward_hooks or mod._forward_pre_hooks:
        return False
    return type(mod) is nn.Identity or (isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training)


class PostOp(nn.Module):
    """What a folded BN+act module still does: its post-op children, in order, under their own names."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self._modules.values():
            x = child(x)  # type: ignore[misc]
        return x


def post_op(mod: nn.Module, names: tuple[str, ...]) -> PostOp:
    """The :class:`PostOp` that replaces ``mod`` once its normalization is folded away."""
    return PostOp({n: mod._modules[n] for n in names})  # type: ignore[misc]
