"""Recognize the per-channel affine ops the rewriter folds and read their constants.

Three forms are recognized, each normalized to a :class:`Norm`:

* a batch norm module of any kind in :mod:`.kinds` (torch's batch norms, BN+act modules, frozen
  batch norms) called as ``call_module``; a BN+act module keeps its post-op after the fold;
* ``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` or
  ``torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``
  whose statistics are registered parameters/buffers (``get_attr`` nodes) and ``training=False``;
* :class:`bnfold.layers.InputNorm` (``x * scale + shift`` on axis 1).

At inference each is ``x[:, c] -> scale[c] * x[:, c] + shift[c]`` (see :mod:`bnfold.arith`). A
``Norm`` whose ``reason`` is set can never be folded (no population statistics, computed
parameters, hooks, ...); the reason says why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

from bnfold.arith import Affine, bn_affine
from bnfold.fold_torch.kinds import Recognized, recognize
from bnfold.layers import InputNorm

_F_BN_SIG = inspect.signature(F.batch_norm)
_aten = torch.ops.aten
# torch.batch_norm's argument order; aten.batch_norm is what a torch.export graph calls
_FUNCTIONAL = {F.batch_norm: "F.batch_norm", torch.batch_norm: "torch.batch_norm",
               _aten.batch_norm.default: "aten.batch_norm"}
# the decomposed forms (after ExportedProgram.run_decompositions): tuple outputs, not rewritten
_DECOMPOSED = {_aten._native_batch_norm_legit_no_training.default, _aten.native_batch_norm.default,
               _aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit.no_stats,
               _aten.cudnn_batch_norm.default, _aten.miopen_batch_norm.default}
_TORCH_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                  "cudnn_enabled")


@dataclass
class Norm:
    """One application of a per-channel affine op in the graph."""

    node: fx.Node
    name: str  # the module's qualified name, or the node name for a functional batch norm
    kind: str  # e.g. "BatchNorm2d", "F.batch_norm", "InputNorm"
    channels: int
    ranks: frozenset[int] | None  # input ranks the op accepts; None: any rank >= 2
    affine: Affine | None = None
    reason: str | None = None  # set when this op can never be folded
    attr_nodes: list[fx.Node] = field(default_factory=list)  # get_attr inputs (functional form)
    # the op's own constants, to recompute it unfolded (guard.NormStep): running_mean/var, weight, bias
    # and eps for a batch norm; scale and shift (eps None) for an InputNorm
    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    eps: float | None = None
    post: tuple[str, ...] = ()  # children of a BN+act module that run after the normalization (see kinds)
    any_rank: bool = False  # one channel broadcast to a layer's channels: exact whichever axis the layer mixes

    @property
    def input(self) -> fx.Node:
        arg = self.node.args[0] if self.node.args else self.node.kwargs["input"]
        assert isinstance(arg, fx.Node)
        return arg


def find_norms(gm: fx.GraphModule, bn_paths: set[str]) -> list[Norm]:
    """Every batch norm / InputNorm application in ``gm``, in graph order.

    ``bn_paths`` are the qualified names of batch norm modules in the original model: a functional
    batch norm reading ``<path>.running_mean`` is reported under that module's name.
    """
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = recognize(mod)
            if kind is not None:
                out.append(_module_bn(node, mod, kind))
            elif isinstance(mod, InputNorm):
                out.append(_input_norm(node, mod))
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            out.append(_functional_bn(gm, node, bn_paths))
        elif node.op == "call_function" and node.target in _DECOMPOSED:
            out.append(_decomposed_bn(node))
    return out


def _hooks(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _module_bn(node: fx.Node, mod: nn.Module, kind: Recognized) -> Norm:
    name = str(node.target)
    channels = getattr(mod, "num_features", None)
    channels = channels if isinstance(channels, int) else int(mod.running_mean.shape[0])  # type: ignore[union-attr, index]
    norm = Norm(node, name, type(mod).__name__, channels, kind.ranks, post=kind.post)
    if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
        norm.reason = f"{name} ({kind}) is not initialized yet; run one forward pass before folding"
    elif _hooks(mod):
        norm.reason = f"{name} has forward hooks, which would stop running if it were removed; remove the hooks first"
    elif mod.running_mean is None or mod.running_var is None:  # type: ignore[union-attr]
        norm.reason = (
            f"{name} has no population statistics (track_running_stats="
            f"{getattr(mod, 'track_running_stats', None)}): it normalizes with the statistics of each batch, "
            "which no fixed affine map reproduces"
        )
    else:
        _set_affine(norm, mod.running_mean, mod.running_var, float(mod.eps),  # type: ignore[arg-type]
                    mod.weight, mod.bias)  # type: ignore[arg-type]
    return norm


def _input_norm(node: fx.Node, mod: InputNorm) -> Norm:
    name = str(node.target)
    norm = Norm(node, name, "InputNorm", int(mod.num_features), None)
    if _hooks(mod):
        norm.reason = f"{name} has forward hooks, which would stop running if it were removed; remove the hooks first"
        return norm
    scale = mod.scale.detach().double().cpu().numpy()
    shift = mod.shift.detach().double().cpu().numpy()
    if scale.shape != shift.shape or scale.ndim != 1 or not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        norm.reason = f"{name} has scale/shift of shapes {scale.shape}/{shift.shape} that are not finite 1-D vectors"
    else:
        norm.affine = Affine(scale=scale, shift=shift)
        norm.channels = int(scale.shape[0])
        norm.tensors = {"scale": mod.scale, "shift": mod.shift}
    return norm


def _bind(node: fx.Node) -> dict[str, Any] | None:
    if node.target is F.batch_norm:
        try:
            bound = _F_BN_SIG.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return dict(bound.arguments)
    args = dict(zip(_TORCH_BN_ARGS, node.args, strict=False))
    args.update(node.kwargs)
    return args if all(k in args for k in _TORCH_BN_ARGS[:8]) else None


def _decomposed_bn(node: fx.Node) -> Norm:
    name = _owner_name(node.args[3] if len(node.args) > 3 else None) or node.name
    op = getattr(node.target, "__name__", str(node.target))
    return Norm(node, name, op, 0, None, reason=(
        f"{name}: {op} is the decomposed batch norm of a torch.export graph after run_decompositions(), which "
        "bnfold does not rewrite; fold the ExportedProgram's module() before decomposing, or the eager model"))


def _owner_name(rm: object) -> str | None:
    """``layer.bn`` for a running mean read as ``get_attr layer.bn.running_mean`` (the batch norm's module path)."""
    if isinstance(rm, fx.Node) and rm.op == "get_attr" and str(rm.target).endswith(".running_mean"):
        return str(rm.target).rpartition(".")[0]
    return None


def _functional_bn(gm: fx.GraphModule, node: fx.Node, bn_paths: set[str]) -> Norm:
    fn = _FUNCTIONAL[node.target]
    args = _bind(node)
    name = _owner_name(args.get("running_mean") if args else None) or node.name
    norm = Norm(node, name, fn, 0, None)
    if args is None:
        norm.reason = f"{name}: cannot read the arguments of this {fn} call"
        return norm
    tensors: dict[str, torch.Tensor | None] = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if isinstance(value, fx.Node):
            if value.op != "get_attr":
                norm.reason = (
                    f"{name}: the {key} passed to {fn} is computed at run time (by {value.name}), not a registered "
                    "parameter or buffer, so it is not a constant that can be folded"
                )
                return norm
            norm.attr_nodes.append(value)
            value = _fetch(gm, str(value.target))
        if value is not None and not isinstance(value, torch.Tensor):
            norm.reason = f"{name}: the {key} passed to {fn} is a {type(value).__name__}, not a tensor"
            return norm
        tensors[key] = value
    training, eps = args["training"], args["eps"]
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        norm.reason = (
            f"{name}: {fn} is called without running statistics, so it normalizes with the statistics of each "
            "batch, which no fixed affine map reproduces"
        )
    elif training is not False:
        norm.reason = (
            f"{name}: {fn} is called with training={training!r}, so it uses batch statistics even in eval mode; "
            "pass training=self.training (or False)"
        )
    elif not isinstance(eps, (int, float)):
        norm.reason = f"{name}: eps passed to {fn} is {eps!r}, not a constant number"
    else:
        norm.channels = int(tensors["running_mean"].shape[0]) if tensors["running_mean"].dim() == 1 else 0
        _set_affine(norm, tensors["running_mean"], tensors["running_var"], float(eps),
                    tensors["weight"], tensors["bias"])
    return norm


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().cpu().numpy()


def _set_affine(norm: Norm, mean: torch.Tensor, var: torch.Tensor, eps: float,
                gamma: torch.Tensor | None, beta: torch.Tensor | None) -> None:
    norm.tensors = {"running_mean": mean, "running_var": var, "weight": gamma, "bias": beta}
    norm.eps = eps
    try:
        norm.affine = bn_affine(_np(mean), _np(var), eps, _np(gamma), _np(beta))  # type: ignore[arg-type]
    except ValueError as e:
        norm.reason = f"{norm.name}: {e}"
        return
    if norm.channels and norm.affine.channels != norm.channels:
        norm.reason = f"{norm.name} has num_features={norm.channels} but {norm.affine.channels} running statistics"
    norm.channels = norm.affine.channels
