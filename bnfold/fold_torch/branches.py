"""Structural re-parameterization: parallel convolution branches summed over one input become one convolution.

RepVGG, ACNet and MobileOne blocks train with several branches over the same input ``x`` and add
them: a ``k x k`` conv+BN, a ``1 x 1`` conv+BN, and an identity branch holding only a BN. Once each
branch's batch norm is folded into its convolution, the sum is linear in ``x``::

    sum_i conv(x; W_i, b_i, padding p_i) + bn(x)
        = conv(x; sum_i embed(W_i) + embed(diag(scale)), sum_i b_i + shift, padding P)

with ``embed`` placing each kernel inside the largest one (see :func:`bnfold.arith.embed_kernel`) and
the identity BN a ``1 x 1`` kernel with its scale on the diagonal (:func:`bnfold.arith.affine_kernel`).
It is exact when every branch reads the same ``x`` with the same stride, dilation and groups, zero
padding, and the kernels line up: kernel ``k`` with padding ``p`` sits at offset ``(P - p) / d``
inside the ``K``-kernel with padding ``P``, and every branch gives the same output size
(``2p - d(k - 1) == 2P - d(K - 1)``). An identity branch needs stride 1 and as many output as input
channels. The merged convolution replaces the largest branch's module (same name); the other branch
modules go away.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from bnfold.arith import affine_kernel, embed_kernel
from bnfold.fold_torch.guard import RankDispatch
from bnfold.fold_torch.layers import Layer, as_layer
from bnfold.fold_torch.match import is_identity, is_referenced
from bnfold.fold_torch.norms import Norm

_ADDS = (operator.add, operator.iadd, torch.add)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Merge:
    """One merged block: the module now computing it, and the batch norms of identity branches it absorbed."""

    into: str
    branches: list[str]
    norms: list[str]


def _is_add(node: fx.Node) -> bool:
    """``a + b`` of tensors, or of a tensor and the number 0 (``out = 0; out += branch(x)``)."""
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) or _zero(a) for a in node.args)
            and any(isinstance(a, fx.Node) for a in node.args))


def _zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _terms(gm: fx.GraphModule, root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The summands of the add tree at ``root`` (through single-use adds and identity ops), and the tree's nodes."""
    terms: list[fx.Node] = []
    tree: list[fx.Node] = [root]
    stack = [a for a in root.args if isinstance(a, fx.Node)]
    while stack:
        node = stack.pop()
        while is_identity(gm, node) and len(node.users) == 1 and isinstance(node.args[0], fx.Node):
            tree.append(node)
            node = node.args[0]
        if _is_add(node) and len(node.users) == 1:
            tree.append(node)
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
        else:
            terms.append(node)
    return terms, tree


def merge_branches(gm: fx.GraphModule, norms: dict[fx.Node, Norm]) -> list[Merge]:
    """Merge every summed set of parallel convolution branches in ``gm`` that merges exactly (see module doc).

    ``norms`` maps a batch norm node still in the graph to its :class:`Norm` (the identity branches).
    """
    merges = []
    for root in list(gm.graph.nodes):
        if root.graph is not gm.graph or not _is_add(root):
            continue
        if len(root.users) == 1 and _is_add(next(iter(root.users))):
            continue  # an inner add: merged from the outermost one
        terms, tree = _terms(gm, root)
        merge = _plan(gm, terms, norms)
        if merge is not None:
            merges.append(_rewrite(gm, root, tree, terms, *merge))
    return merges


def _plan(gm: fx.GraphModule, terms: list[fx.Node], norms: dict[fx.Node, Norm]
          ) -> tuple[fx.Node, list[tuple[fx.Node, Layer]], list[tuple[fx.Node, Norm | None]]] | None:
    """``(x, conv branches, identity branches)`` when the terms merge exactly, else None."""
    if len(terms) < 2 or len(set(terms)) != len(terms):
        return None
    convs: list[tuple[fx.Node, Layer]] = []
    for t in terms:
        layer = _plain_conv(gm, t)
        if layer is not None and len(t.users) == 1:
            convs.append((t, layer))
    if not convs:
        return None
    x = convs[0][0].args[0]
    if not isinstance(x, fx.Node) or any(t.args[0] is not x for t, _ in convs):
        return None
    conv_nodes = {t for t, _ in convs}
    idents: list[tuple[fx.Node, Norm | None]] = []
    for t in terms:
        if t in conv_nodes:
            continue
        norm = norms.get(t)
        if t is x:
            idents.append((t, None))
        elif (norm is not None and norm.affine is not None and not norm.post and norm.input is x
              and len(t.users) == 1 and t.op == "call_module"):
            idents.append((t, norm))
        else:
            return None
    if len(convs) + len(idents) < 2 or not _compatible([c for _, c in convs], bool(idents)):
        return None
    return x, convs, idents


def _plain_conv(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    if node.op != "call_module" or isinstance(gm.get_submodule(str(node.target)), RankDispatch):
        return None
    layer = as_layer(gm, node)
    if (not isinstance(layer, Layer) or layer.output_only or type(layer.module) not in _CONVS
            or len(node.args) != 1 or node.kwargs):
        return None
    mod = layer.module
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):  # type: ignore[union-attr]
        return None
    return layer


def _geometry(layer: Layer) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    mod = layer.module
    return (tuple(mod.kernel_size), tuple(mod.padding), tuple(mod.stride), tuple(mod.dilation))  # type: ignore[union-attr, arg-type]


def _compatible(convs: list[Layer], identity: bool) -> bool:
    first = convs[0]
    _, _, stride, dilation = _geometry(first)
    if any((c.in_channels, c.out_channels, c.groups, c.dims, _geometry(c)[2:], c.module.weight.dtype)  # type: ignore[union-attr]
           != (first.in_channels, first.out_channels, first.groups, first.dims, (stride, dilation),
               first.module.weight.dtype) for c in convs):  # type: ignore[union-attr]
        return False
    if identity and (any(s != 1 for s in stride) or first.in_channels != first.out_channels):
        return False
    big = max(convs, key=lambda c: int(np.prod(_geometry(c)[0])))
    size, pad, _, _ = _geometry(big)
    shapes = [(k, p) for k, p, _, _ in map(_geometry, convs)] + ([((1,) * first.dims, (0,) * first.dims)]
                                                                   if identity else [])
    for k, p in shapes:
        for K, P, kk, pp, d in zip(size, pad, k, p, dilation, strict=True):
            if (P - pp) % d or not 0 <= (P - pp) // d <= K - kk or 2 * pp - d * (kk - 1) != 2 * P - d * (K - 1):
                return False
    return True


def _rewrite(gm: fx.GraphModule, root: fx.Node, tree: list[fx.Node], terms: list[fx.Node], x: fx.Node,
             convs: list[tuple[fx.Node, Layer]], idents: list[tuple[fx.Node, Norm | None]]) -> Merge:
    big_node, big = max(convs, key=lambda c: int(np.prod(_geometry(c[1])[0])))
    size, pad, stride, dilation = _geometry(big)
    weight = np.zeros((big.out_channels, big.in_channels // big.groups, *size))
    bias = np.zeros(big.out_channels)
    for _, layer in convs:
        _, p, _, _ = _geometry(layer)
        mod = layer.module
        offset = tuple((P - pp) // d for P, pp, d in zip(pad, p, dilation, strict=True))
        weight += embed_kernel(mod.weight.detach().double().cpu().numpy(), size, offset)  # type: ignore[union-attr, operator]
        if mod.bias is not None:
            bias += mod.bias.detach().double().cpu().numpy()  # type: ignore[union-attr, operator]
    for _, norm in idents:
        if norm is None:
            from bnfold.arith import Affine

            ident = Affine(scale=np.ones(big.out_channels), shift=np.zeros(big.out_channels))
        else:
            assert norm.affine is not None
            ident = norm.affine
        w1, b1 = affine_kernel(ident, big.in_channels // big.groups, big.groups, big.dims)
        weight += embed_kernel(w1, size, tuple(P // d for P, d in zip(pad, dilation, strict=True)))
        bias += b1
    like: torch.Tensor = big.module.weight  # type: ignore[assignment]
    conv_type: type[nn.Conv2d] = type(big.module)  # type: ignore[assignment]  # Conv1d/2d/3d alike
    merged = conv_type(big.in_channels, big.out_channels, size, stride=stride, padding=pad,  # type: ignore[arg-type]
                       dilation=dilation, groups=big.groups, bias=True,  # type: ignore[arg-type]
                       device=like.device, dtype=like.dtype)
    with torch.no_grad():
        merged.weight.copy_(torch.from_numpy(weight))
        assert merged.bias is not None
        merged.bias.copy_(torch.from_numpy(bias))
    target = str(big_node.target)
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, merged)
    with gm.graph.inserting_before(root):
        call = gm.graph.call_module(target, (x,))
    call.meta.update(root.meta)
    root.replace_all_uses_with(call)
    branches = [str(t.target) if t is not x else "identity" for t in terms]
    dead = [*tree, *(t for t in terms if t is not x)]
    while dead:  # erase users before what they use
        node = next(n for n in dead if not n.users)
        dead.remove(node)
        gm.graph.erase_node(node)
    for t in terms:  # the branches' other modules (convs, identity BNs) go unless used elsewhere
        if t is not x and t is not big_node and not is_referenced(gm, str(t.target)):
            gm.delete_submodule(str(t.target))
    return Merge(into=target, branches=branches, norms=[n.name for _, n in idents if n is not None])
