"""Match, check and rewrite one batch norm: fold it into the layer before it, else the layer after it.

For a :class:`~bnfold.fold_torch.norms.Norm` the rewrite tries, in order:

1. *output side*: the op producing the norm's input (through identity ops) is a Conv/ConvTranspose/
   Linear module whose output has no other consumer, whose output channels are the norm's
   channels, and whose channel axis is the norm's axis 1;
2. *input side*: the norm's output (through identity ops) goes only to the data input of a
   Conv/ConvTranspose/Linear module with matching input channels, and moving the shift into the
   bias is exact (:func:`bnfold.arith.input_side_exactness`).

A BN+act module (:mod:`.kinds`) folds only into the layer before it; the module is then replaced
by its post-op (``drop``, ``act``), so the graph keeps its structure and parameter names.

The layer's new weight and bias are computed in float64 by :mod:`bnfold.arith` and cast back to
the layer's dtype. They are always new tensors: when the layer module is also used elsewhere (called
at another site, or its parameters read by ``get_attr``), the fold goes into a private copy of the
module and the other uses keep the original. The norm's node is then removed, and its module (or
its now-unused constants) deleted from the module tree.

Some folds are exact at one input rank only (``Linear -> BatchNorm1d`` for 2-D tensors). When neither
the caller's ``example_inputs`` nor the graph's structure fix that rank (shapes guessed from the first
layer, or none), the layer is replaced by a :class:`~bnfold.fold_torch.guard.RankDispatch`: the folded
layer for inputs of that rank, the original layer and norm (as constants) for any other rank. The folded
model is then never wrong and never fails at a rank the original accepted. A later fold into the same
layer (a chain) goes into both paths.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import fx, nn

from bnfold.arith import Affine, broadcast_channel, repeat_channels
from bnfold.fold_torch.guard import NormStep, RankDispatch
from bnfold.fold_torch.kinds import post_op
from bnfold.fold_torch.layers import (
    Layer,
    Side,
    as_layer,
    assign,
    channel_problem,
    describe,
    exactness_problem,
    folded_params,
    rank_pinned,
    rank_problem,
)
from bnfold.fold_torch.match import channel_major_flatten, consumer, is_referenced, only_data_input, producer
from bnfold.fold_torch.norms import Norm
from bnfold.fold_torch.ranks import RANKS_KEY, Ranks, known_ranks
from bnfold.fold_torch.trace import SHAPE_KEY
from bnfold.result import Folded


def try_fold(gm: fx.GraphModule, norm: Norm, notes: list[str], trusted_shapes: bool = False) -> Folded | str:
    """Fold ``norm`` if some side allows it exactly; otherwise return why neither does.

    ``trusted_shapes``: the recorded shapes come from the caller (``example_inputs``/``input_shape``),
    so a rank they fix needs no run-time check.
    """
    assert norm.affine is not None
    start = norm.input
    prod, shared = producer(gm, norm.node, start)
    # "not a foldable layer" is the more useful reason when both apply
    out_norm = _broadcast(gm, norm, prod, "output")
    before = _check(gm, out_norm, prod, known_ranks(start), "output") or shared
    if before is None:
        return _apply(gm, out_norm, prod, "output", notes,
                      not trusted_shapes and _needs_guard(gm, out_norm, prod, start))
    if shared is None and _cat_pieces(prod) is not None:
        result = _through_cat(gm, norm, prod, notes, trusted_shapes)
        if isinstance(result, Folded):
            return result
        before = result
    if norm.post:
        after = " then ".join(f"{c} ({type(gm.get_submodule(f'{norm.name}.{c}')).__name__})" for c in norm.post)
        return (f"cannot fold into the op before it ({before}), and {norm.name} applies {after} after normalizing, "
                "so it cannot fold into the op after it")
    cons, value, problem = consumer(gm, norm.node)
    if problem is None and cons is not None and channel_major_flatten(gm, cons) and not _graph_output(value):
        norm, (cons, value, problem) = _through_flatten(gm, norm, value, cons), consumer(gm, cons)
    if problem is None and cons is not None:
        norm = _broadcast(gm, norm, cons, "input")
        if not only_data_input(cons, value):
            problem = f"{describe(gm, cons)} uses it as more than its data input"
        else:
            problem = _check(gm, norm, cons, known_ranks(value), "input")
        if problem is None:
            return _apply(gm, norm, cons, "input", notes, not trusted_shapes and _needs_guard(gm, norm, cons, value))
    return f"cannot fold into the op before it ({before}) nor into the op after it ({problem})"


def _graph_output(value: fx.Node) -> bool:
    return any(u.op == "output" for u in value.users)


def _through_flatten(gm: fx.GraphModule, norm: Norm, value: fx.Node, flatten: fx.Node) -> Norm:
    """``norm`` as seen after ``flatten(x, 1)``: each channel a contiguous block of features (see arith).

    The block is the product of the spatial sizes: from the recorded shape, else from the Linear after it
    (``in_features / channels``, which the model must satisfy to run at all).
    """
    assert norm.affine is not None
    shape = value.meta.get(SHAPE_KEY)
    block = None
    if shape is not None and len(shape) >= 2:
        block = int(np.prod(shape[2:], dtype=np.int64))
    else:
        users = [u for u in flatten.users]
        layer = as_layer(gm, users[0]) if len(users) == 1 else None
        if isinstance(layer, Layer) and layer.kind == "linear" and layer.in_channels % norm.channels == 0:
            block = layer.in_channels // norm.channels
    if not block:
        return norm  # the channel check then says why the sizes do not match
    return dataclasses.replace(norm, affine=repeat_channels(norm.affine, block), channels=norm.channels * block,
                               ranks=None)


def _broadcast(gm: fx.GraphModule, norm: Norm, node: fx.Node, side: Side) -> Norm:
    """A one-channel norm next to a layer of several channels, as the same map on each (see arith)."""
    layer = as_layer(gm, node)
    if norm.channels != 1 or not isinstance(layer, Layer) or norm.affine is None:
        return norm
    channels = layer.out_channels if side == "output" else layer.in_channels
    if channels == 1:
        return norm
    return dataclasses.replace(norm, affine=broadcast_channel(norm.affine, channels), channels=channels,
                               any_rank=True)


def _check(gm: fx.GraphModule, norm: Norm, node: fx.Node, ranks: Ranks | None, side: Side) -> str | None:
    layer = as_layer(gm, node)
    if isinstance(layer, str):
        return layer
    target = str(node.target)
    if side == "input" and layer.output_only:
        return (f"{target} ({layer.type_name}) has a forward of its own: bnfold folds into it only from the output "
                "side, where a probe confirmed the fold is exact")
    problem = channel_problem(layer, target, norm.name, norm.channels, side)
    if problem is None and not norm.any_rank:
        problem = rank_problem(layer, target, norm.kind, norm.name, norm.ranks, ranks, side)
    if problem is None and side == "input":
        assert norm.affine is not None
        problem = exactness_problem(layer, norm.affine)
        if problem is not None:
            problem = f"{target} ({layer.type_name}): {problem}"
    return problem


def _needs_guard(gm: fx.GraphModule, norm: Norm, node: fx.Node, value: fx.Node) -> bool:
    """True when only the (guessed or absent) shapes, not the graph's structure, make the fold exact."""
    layer = as_layer(gm, node)
    assert isinstance(layer, Layer)
    if norm.any_rank:
        return False
    return not rank_pinned(layer, norm.ranks, value.meta.get(RANKS_KEY) or None)


def _apply(gm: fx.GraphModule, norm: Norm, node: fx.Node, side: Side, notes: list[str], guard: bool) -> Folded:
    target = _fold_into(gm, norm, node, side, notes, guard)
    _remove(gm, norm)
    return Folded(bn=norm.name, into=target, side=side)


def _fold_into(gm: fx.GraphModule, norm: Norm, node: fx.Node, side: Side, notes: list[str], guard: bool) -> str:
    """Fold ``norm``'s affine map into the layer ``node`` calls (a private copy if shared); return its name."""
    target = _private_target(gm, node, notes)
    layer = as_layer(gm, node)
    assert isinstance(layer, Layer) and norm.affine is not None
    mod = layer.module
    holder = gm.get_submodule(target)
    dispatch = holder if isinstance(holder, RankDispatch) else None
    if dispatch is None and guard:
        dispatch = RankDispatch(mod, mod, layer.good_rank)  # copies the original weights before the fold
        _set_module(gm, target, dispatch)
        notes.append(f"{norm.name} was folded into {target} for {layer.good_rank}-D input (the only rank at which "
                     "the fold is exact; nothing fixed the input rank): on inputs of other ranks the folded model "
                     f"computes the original {layer.type_name} and batch norm instead. Pass example_inputs=... to "
                     "fold without this rank dispatch")
    weight, bias = folded_params(layer, norm.affine, side)
    old_w, old_b = mod.weight, mod.bias
    assign(mod, "weight", weight, old_w)  # type: ignore[arg-type]
    assign(mod, "bias", bias, old_w if old_b is None else old_b)  # type: ignore[arg-type]
    if dispatch is not None:  # the unfolded path must apply this norm too
        step = NormStep(norm.tensors, norm.eps)
        if side == "output":
            dispatch.after.append(step)
        else:  # a norm folding in later sits before the ones already folded in
            dispatch.before.insert(0, step)
    return target


def _cat_pieces(node: fx.Node) -> list[fx.Node] | None:
    """The inputs of ``torch.cat(tensors, dim=1)``, when that is what ``node`` is and each input appears once."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if (not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or dim != 1
            or not all(isinstance(t, fx.Node) for t in tensors) or len(set(tensors)) != len(tensors)):
        return None
    return list(tensors)  # type: ignore[arg-type]


def _through_cat(gm: fx.GraphModule, norm: Norm, cat: fx.Node, notes: list[str], trusted: bool) -> Folded | str:
    """Fold ``norm`` after ``torch.cat([layer_1(..), layer_2(..), ...], dim=1)``: channel slice ``i`` of its map
    into ``layer_i`` (MixNet's mixed convolutions, Inception-style branches). All slices fold, or none."""
    pieces = _cat_pieces(cat)
    assert pieces is not None and norm.affine is not None
    plan: list[tuple[Norm, fx.Node]] = []
    lo = 0
    for i, piece in enumerate(pieces):
        prod, shared = producer(gm, cat, piece)
        layer = as_layer(gm, prod)
        if isinstance(layer, str) or shared:
            return f"input {i} of {describe(gm, cat)}: {shared or layer}"
        hi = lo + layer.out_channels
        if hi > norm.channels:
            break
        part = slice(lo, hi)
        sub = dataclasses.replace(
            norm, channels=layer.out_channels,
            affine=Affine(scale=norm.affine.scale[part], shift=norm.affine.shift[part]),
            tensors={k: None if t is None else t[part] for k, t in norm.tensors.items()})
        problem = _check(gm, sub, prod, known_ranks(piece), "output")
        if problem is None and not trusted and _needs_guard(gm, sub, prod, piece):
            problem = f"the input rank of {prod.target} is not known; pass example_inputs=..."
        if problem is not None:
            return f"input {i} of {describe(gm, cat)}: {problem}"
        plan.append((sub, prod))
        lo = hi
    if lo != norm.channels or len(plan) != len(pieces):
        return f"{norm.name} has {norm.channels} channels but the layers concatenated by {cat.name} give {lo}+"
    into = [_fold_into(gm, sub, prod, "output", notes, guard=False) for sub, prod in plan]
    _remove(gm, norm)
    return Folded(bn=norm.name, into=", ".join(into), side="output")


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _other_uses(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> list[str]:
    # Every name under which ``mod`` is registered (a module can sit at several paths); one pass over
    # the module tree, then set lookups per node, so a fold costs O(nodes + modules).
    aliases = {name for name, m in gm.named_modules(remove_duplicate=False) if m is mod}
    uses = []
    for n in gm.graph.nodes:
        if n is node:
            continue
        if n.op == "call_module" and n.target in aliases:
            uses.append(f"call {n.target} ({n.name})")
        elif n.op == "get_attr" and (str(n.target).rpartition(".")[0] in aliases or n.target in aliases):
            uses.append(f"read {n.target} ({n.name})")
    return uses


def _private_target(gm: fx.GraphModule, node: fx.Node, notes: list[str]) -> str:
    """The module name to fold into: ``node``'s own, or a fresh private copy if the module is shared."""
    target = str(node.target)
    mod = gm.get_submodule(target)
    uses = _other_uses(gm, node, mod)
    if not uses:
        _note_ties(gm, target, mod, notes)
        return target
    new = _fresh_name(gm, f"{target}_folded")
    gm.add_submodule(new, copy.deepcopy(mod))
    node.target = new
    notes.append(f"{target} is also used elsewhere ({'; '.join(uses)}): folded into a private copy {new}, "
                 "the other uses keep the original weights")
    return new


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first that names no submodule of ``gm`` yet."""
    k = 0
    while True:
        new = f"{base}{'' if k == 0 else f'_{k}'}"
        try:
            gm.get_submodule(new)
        except AttributeError:
            return new
        k += 1


def _note_ties(gm: fx.GraphModule, target: str, mod: nn.Module, notes: list[str]) -> None:
    for pname in ("weight", "bias"):
        p = getattr(mod, pname, None)
        if p is None:
            continue
        ties = [n for n, q in gm.named_parameters(remove_duplicate=False) if q is p and n != f"{target}.{pname}"]
        ties += [n for n, q in gm.named_buffers(remove_duplicate=False) if q is p and n != f"{target}.{pname}"]
        if ties:
            notes.append(f"{target}.{pname} was shared with {', '.join(ties)}: the folded layer got its own copy, "
                         "the other use keeps the original values")


def _remove(gm: fx.GraphModule, norm: Norm) -> None:
    node = norm.node
    if norm.post:  # a BN+act module: what remains of it is its post-op, under the same name
        target = str(node.target)
        post = post_op(gm.get_submodule(target), norm.post)
        if any(n is not node and n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            node.target = _fresh_name(gm, f"{target}_post")  # other sites still normalize: a post-op of its own
            gm.add_submodule(str(node.target), post)
        else:
            _set_module(gm, target, post)
        return
    node.replace_all_uses_with(norm.input)
    gm.graph.erase_node(node)
    if node.op == "call_module":
        target = str(node.target)
        if any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            return  # applied at another place too, not folded (yet) there: the module stays
        if not is_referenced(gm, target):
            gm.delete_submodule(target)
        else:  # forward still reads e.g. bn.weight: keep the tensors, not a batch norm that is never called
            _replace_with_holder(gm, target)
        return
    erased: set[fx.Node] = set()
    for attr in norm.attr_nodes:
        if attr in erased or attr.users:
            continue
        erased.add(attr)
        gm.graph.erase_node(attr)
        if any(n.op == "get_attr" and n.target == attr.target for n in gm.graph.nodes):
            continue
        owner_path, _, name = str(attr.target).rpartition(".")
        owner = gm.get_submodule(owner_path)
        if any(n.op == "call_module" and gm.get_submodule(n.target) is owner for n in gm.graph.nodes):
            continue  # the owner is a live module: leave its attributes alone
        if name in owner._parameters:
            del owner._parameters[name]
        elif name in owner._buffers:
            del owner._buffers[name]
        elif hasattr(owner, name):
            delattr(owner, name)


def _replace_with_holder(gm: fx.GraphModule, target: str) -> None:
    """Swap module ``target`` for a plain ``nn.Module`` holding the same parameters and buffers."""
    mod = gm.get_submodule(target)
    holder = nn.Module()
    for name, param in mod.named_parameters(recurse=False):
        holder.register_parameter(name, param)
    for name, buf in mod.named_buffers(recurse=False):
        holder.register_buffer(name, buf, persistent=name not in mod._non_persistent_buffers_set)
    _set_module(gm, target, holder)
