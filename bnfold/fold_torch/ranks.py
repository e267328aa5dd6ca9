"""Which tensor ranks each graph value can have, read from the graph alone (no example inputs).

Without shapes, a fold whose correctness depends on the input rank (``Linear -> BatchNorm1d`` is
exact for 2-D tensors only) would have to be refused. Many graphs fix the rank structurally
though: ``Flatten()`` (``start_dim=1``) always yields 2-D, ``x.view(n, -1)`` yields 2-D,
``BatchNorm2d`` only accepts 4-D, a Conv2d yields 3-D or 4-D. :func:`annotate_ranks` propagates such
facts forward and stores, per node, the set of ranks its output may have; a node with no entry may
have any rank. The rules are conservative: an op not listed here gives "unknown".
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.fold_torch.kinds import recognize
from bnfold.fold_torch.trace import SHAPE_KEY
from bnfold.layers import InputNorm

RANKS_KEY = "bnfold_ranks"
Ranks = frozenset[int]

_SAME_RANK_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, InputNorm, nn.Linear,
)
_SAME_RANK_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.linear, torch.neg, torch.abs,
)
_SAME_RANK_METHODS = ("relu", "sigmoid", "tanh", "contiguous", "float", "double", "half", "to", "clone", "neg", "abs",
                      "relu_", "sigmoid_", "tanh_")
_BINARY = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div)
_SPATIAL = {
    nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3,
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}


def known_ranks(node: fx.Node) -> Ranks | None:
    """The ranks ``node``'s output may have: from recorded shapes, else from the graph; None if unknown."""
    shape = node.meta.get(SHAPE_KEY)
    if shape is not None:
        return frozenset({len(shape)})
    ranks = node.meta.get(RANKS_KEY)
    return ranks if ranks else None


def annotate_ranks(gm: fx.GraphModule) -> None:
    """Store the possible output ranks of every node whose rank the graph determines (see module doc)."""
    for node in gm.graph.nodes:
        ranks = _ranks(gm, node)
        if ranks:
            node.meta[RANKS_KEY] = ranks


def _in(node: fx.Node) -> Ranks | None:
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return known_ranks(arg) if isinstance(arg, fx.Node) else None


def _meet(a: Ranks | None, b: Ranks) -> Ranks:
    return b if a is None else a & b


def _ranks(gm: fx.GraphModule, node: fx.Node) -> Ranks | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return _module_ranks(mod, _in(node))
    if node.op == "call_function":
        return _function_ranks(node)
    if node.op == "call_method":
        return _method_ranks(node)
    return None


def _module_ranks(mod: nn.Module, inp: Ranks | None) -> Ranks | None:
    for cls, d in _SPATIAL.items():
        if type(mod) is cls:
            return _meet(inp, frozenset({d + 1, d + 2}))
    norm = recognize(mod)
    if norm is not None:
        return inp if norm.ranks is None else _meet(inp, norm.ranks)
    if type(mod) is nn.Flatten:
        start, end = mod.start_dim, mod.end_dim
        if end == -1 and start >= 0:
            return frozenset({start + 1})
        return None
    if type(mod) in _SAME_RANK_MODULES:
        return inp
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _flatten_ranks(start: Any, end: Any) -> Ranks | None:
    s, e = _int(start), _int(end)
    return frozenset({s + 1}) if s is not None and s >= 0 and e == -1 else None


def _size_count(sizes: tuple[Any, ...]) -> Ranks | None:
    """Rank produced by ``view``/``reshape`` with these size arguments (ints or traced scalars)."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) == 1 and isinstance(sizes[0], (fx.Node, torch.dtype)):
        return None  # a whole torch.Size (length unknown here), or view(dtype), which keeps the rank
    return frozenset({len(sizes)}) if sizes else None


def _function_ranks(node: fx.Node) -> Ranks | None:
    fn, args, kwargs = node.target, node.args, node.kwargs
    if fn is torch.flatten:
        return _flatten_ranks(args[1] if len(args) > 1 else kwargs.get("start_dim", 0),
                              args[2] if len(args) > 2 else kwargs.get("end_dim", -1))
    if fn is torch.reshape:
        return _size_count(tuple(args[1:]) or (kwargs.get("shape"),))
    if fn in _SAME_RANK_FUNCTIONS:
        return _in(node)
    if fn in _BINARY and len(args) == 2:
        a, b = (known_ranks(x) if isinstance(x, fx.Node) else frozenset({0}) if isinstance(x, (int, float)) else None
                for x in args)
        if a is not None and b is not None and len(a) == 1 and len(b) == 1:
            return frozenset({max(next(iter(a)), next(iter(b)))})
    if fn is torch.cat and args and isinstance(args[0], (tuple, list)) and args[0]:
        first = args[0][0]
        return known_ranks(first) if isinstance(first, fx.Node) else None
    return None


def _method_ranks(node: fx.Node) -> Ranks | None:
    name, args, kwargs = node.target, node.args, node.kwargs
    if name == "flatten":
        return _flatten_ranks(args[1] if len(args) > 1 else kwargs.get("start_dim", 0),
                              args[2] if len(args) > 2 else kwargs.get("end_dim", -1))
    if name in ("view", "reshape") and not kwargs:
        return _size_count(tuple(args[1:]))
    if name in _SAME_RANK_METHODS:
        return _in(node)
    return None
