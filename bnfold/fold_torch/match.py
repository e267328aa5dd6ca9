"""Find the layer next to a batch norm, looking through ops that are the identity at inference.

A fold rewrites the values on the path between layer and batch norm, so every value on that path
must have exactly one consumer (the next op on the path) and must not be a graph output: otherwise
some other consumer would see the folded value instead of the original one. Ops that are the
identity in eval mode (``Dropout*``, ``Identity``, ``F.dropout(..., training=False)``,
``.contiguous()``) may sit on the path.

Reading a value's metadata (``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``, ``x.dtype``,
``x.device``, ``len(x)``, ``x.numel()``) is not a use: an exact fold keeps shape, dtype and device,
so such reads (and the ``torch._assert`` checks built on them, as in timm's norm layers) see the
same values before and after it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.fold_torch.layers import describe

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_F_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_TORCH_DROPOUTS = (torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout)


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor an identity-like op passes through (its first argument)."""
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return arg if isinstance(arg, fx.Node) else None


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` returns its first argument unchanged at inference."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return (type(mod) in _IDENTITY_MODULES and not mod.training and not mod._forward_hooks
                and not mod._forward_pre_hooks and len(node.args) + len(node.kwargs) == 1)
    if node.op == "call_method":
        return node.target == "contiguous" and len(node.args) == 1 and not node.kwargs
    if node.op != "call_function":
        return False
    if node.target in _F_DROPOUTS:
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
        except TypeError:
            return False
        bound.apply_defaults()
        training, p = bound.arguments["training"], bound.arguments["p"]
        return training is False or (isinstance(p, (int, float)) and p == 0)
    if node.target in _TORCH_DROPOUTS:
        if len(node.args) != 3 or node.kwargs:
            return False
        return node.args[2] is False or (isinstance(node.args[1], (int, float)) and node.args[1] == 0)
    return False


_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})


def is_metadata_read(node: fx.Node, value: fx.Node) -> bool:
    """True when ``node`` reads only the shape, rank, dtype or device of ``value``, never its values."""
    if not node.args or node.args[0] is not value:
        return False
    others: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), others.append)  # type: ignore[arg-type]
    if others:
        return False
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRS
    if node.op == "call_function":
        return node.target in (len, torch.numel) and len(node.args) == 1
    return node.op == "call_method" and node.target in _METADATA_METHODS


def users(value: fx.Node) -> list[fx.Node]:
    """The nodes using ``value``'s data (metadata reads are not uses, see the module docstring)."""
    return [u for u in value.users if not is_metadata_read(u, value)]


def _single_use(gm: fx.GraphModule, value: fx.Node, user: fx.Node, what: str) -> str | None:
    others = [u for u in users(value) if u is not user]
    if not others:
        return None
    names = ", ".join(describe(gm, u) for u in others)
    return f"{what} is also used by {names}; folding would change that use too"


def producer(gm: fx.GraphModule, norm_node: fx.Node, start: fx.Node) -> tuple[fx.Node, str | None]:
    """Walk up from the norm's input ``start`` through identity ops to the op that produces it.

    Returns that op and, if some value on the way has another consumer, why folding is refused.
    """
    user, cur = norm_node, start
    while True:
        what = f"the output of {describe(gm, cur)}"
        problem = _single_use(gm, cur, user, what)
        if problem:
            return cur, problem
        if not is_identity(gm, cur):
            return cur, None
        nxt = data_input(cur)
        if nxt is None:
            return cur, None
        user, cur = cur, nxt


def consumer(gm: fx.GraphModule, norm_node: fx.Node) -> tuple[fx.Node | None, fx.Node, str | None]:
    """Walk down from the norm through identity ops to its single consumer.

    Returns ``(consumer, value it consumes, problem)``; ``consumer`` is None with a problem when the
    value has zero or several consumers.
    """
    cur = norm_node
    while True:
        found = users(cur)
        if len(found) != 1:
            names = ", ".join(describe(gm, u) for u in found) or "nothing"
            return None, cur, f"its output goes to {names}, not to a single layer"
        nxt = found[0]
        if not is_identity(gm, nxt) or data_input(nxt) is not cur:
            return nxt, cur, None
        cur = nxt


def channel_major_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` is ``flatten(x, 1)`` (``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``):
    every axis from 1 on merged, so each channel of ``x`` becomes a contiguous block of features."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return bool(type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1 and not mod._forward_hooks
                and not mod._forward_pre_hooks and len(node.args) == 1 and not node.kwargs)
    if (node.op, node.target) not in (("call_function", torch.flatten), ("call_method", "flatten")):
        return False
    names = ("input", "start_dim", "end_dim")
    args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return bool(set(args) <= set(names) and args.get("start_dim", 0) == 1 and args.get("end_dim", -1) == -1)


def is_referenced(gm: fx.GraphModule, target: str) -> bool:
    """True when some node still calls module ``target`` or reads an attribute of it."""
    return any(n.op in ("call_module", "get_attr") and (n.target == target or str(n.target).startswith(f"{target}."))
               for n in gm.graph.nodes)


def only_data_input(node: fx.Node, value: fx.Node) -> bool:
    """True when ``value`` is ``node``'s first argument and appears in no other argument."""
    if data_input(node) is not value:
        return False
    count = 0

    def visit(arg: object) -> object:
        nonlocal count
        count += arg is value
        return arg

    fx.node.map_aggregate((node.args, node.kwargs), visit)  # type: ignore[arg-type]
    return count == 1
