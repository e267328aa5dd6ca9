"""MatMul with a constant 2-D weight ``W (K, N)``, and its bias ``Add``.

MatMul has no bias input: a BN after it folds into ``W`` (columns) and into the constant of a
following ``Add`` (or a new ``Add``); a BN before it folds into ``W`` (rows) and its shift term goes
into the bias of the ``Add`` that alone consumes the MatMul (or a new ``Add``). BN normalizes axis 1
while MatMul contracts/produces the *last* axis, so both agree only for 2-D tensors: the rank comes
from shape inference and anything else is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold.arith import Affine, fold_input_side, fold_output_side
from bnfold.fold_onnx._graph import Const, Graph, node_id
from bnfold.fold_onnx._rewrite import Rewrite, affine_rows, bias_rows, bypass, squeeze_rows, take_over_output


class MatMulFold:
    """``MatMul(A, W)`` with a constant 2-D ``W``, optionally followed by ``Add(·, bias)``."""

    op_type = "MatMul"

    def _weight(self, g: Graph, mm: onnx.NodeProto) -> Const | str:
        w = g.constant(mm.input[1], "weight", mm)
        if isinstance(w, str):
            return w
        if w.value.ndim != 2:
            return f"weight '{w.name}' of {g.describe(mm)} has shape {w.value.shape}; only a 2-D weight folds"
        return w

    def _rank_problem(self, g: Graph, name: str, what: str) -> str | None:
        rank = g.rank(name)
        if rank == 2:
            return None
        shown = "unknown" if rank is None else str(rank)
        return (f"{what} ('{name}') has rank {shown}; batch norm normalizes axis 1 but MatMul works on the last "
                "axis, which agree only for 2-D tensors (give the graph inputs static ranks if it is 2-D)")

    def _split_add(self, g: Graph, add: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | str:
        for i in (0, 1):
            mm = g.producer.get(add.input[i])
            if mm is not None and mm.op_type == "MatMul" and mm.domain in ("", "ai.onnx"):
                return mm, 1 - i
        return (f"its input comes from {g.describe(add)}, which does not add a bias to a MatMul; only Conv, "
                "ConvTranspose, Gemm, MatMul and MatMul+Add absorb a following batch norm")

    def fold_after(self, g: Graph, node: onnx.NodeProto, bn: Affine, bn_node: onnx.NodeProto) -> Rewrite | str:
        add: onnx.NodeProto | None = None
        bias: Const | None = None
        bias_index = 0
        if node.op_type == "Add":
            split = self._split_add(g, node)
            if isinstance(split, str):
                return split
            add, (mm, bias_index) = node, split
            found = g.constant(add.input[bias_index], "bias", add)
            if isinstance(found, str):
                return found
            bias = found
            sole = g.sole_consumer(mm.output[0], g.describe(mm))
            if isinstance(sole, str):
                return sole
        else:
            mm = node
        w = self._weight(g, mm)
        if isinstance(w, str):
            return w
        problem = self._rank_problem(g, mm.output[0], f"the output of {g.describe(mm)}")
        if problem:
            return problem
        if w.value.shape[1] != bn.channels:
            return f"{g.describe(mm)} has {w.value.shape[1]} output features but the batch norm has {bn.channels}"
        try:
            w_new, _ = fold_output_side(w.value, None, bn, axis=1)
            b_new = squeeze_rows(affine_rows(bias_rows(bias, 1.0, bn.channels), bn))
        except ValueError as err:
            return str(err)

        def apply() -> None:
            g.set_constant(mm, 1, w_new, w.elem_type, f"{node_id(mm)}_weight")
            if add is not None and bias is not None:
                g.set_constant(add, bias_index, b_new, bias.elem_type, f"{node_id(add)}_bias")
                take_over_output(g, add, bn_node)
            else:
                self._append_add(g, mm, b_new, w.elem_type, bn_node.output[0])
                g.remove_node(bn_node)

        return apply

    def fold_before(
        self, g: Graph, mm: onnx.NodeProto, index: int, bn: Affine, bn_node: onnx.NodeProto
    ) -> Rewrite | str:
        if index != 0:
            return f"it feeds the weight input of {g.describe(mm)}, not its data input"
        w = self._weight(g, mm)
        if isinstance(w, str):
            return w
        problem = self._rank_problem(g, bn_node.input[0], "the batch norm input")
        if problem:
            return problem
        if w.value.shape[0] != bn.channels:
            return f"{g.describe(mm)} has {w.value.shape[0]} input features but the batch norm has {bn.channels}"
        try:
            w_new, add = fold_input_side(w.value, None, bn, axis=0, out_axis=1)
        except ValueError as err:
            return str(err)
        following = self._following_bias(g, mm, add)

        def apply() -> None:
            g.set_constant(mm, 1, w_new, w.elem_type, f"{node_id(mm)}_weight")
            if following is not None:  # merge the shift term into the existing bias
                add_node, index, bias, merged = following
                g.set_constant(add_node, index, merged, bias.elem_type, f"{node_id(add_node)}_bias")
            else:
                out = mm.output[0]
                g.set_output(mm, 0, g.fresh(f"{out}_matmul"))
                self._append_add(g, mm, add, w.elem_type, out)
            bypass(g, mm, 0, bn_node)

        return apply

    def layer_of(self, g: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
        """The MatMul behind ``node`` (``node`` itself, or the MatMul feeding an Add)."""
        split = self._split_add(g, node) if node.op_type == "Add" else None
        return split[0] if isinstance(split, tuple) else node

    def _following_bias(
        self, g: Graph, mm: onnx.NodeProto, add: np.ndarray
    ) -> tuple[onnx.NodeProto, int, Const, np.ndarray] | None:
        """The Add of a constant that alone consumes ``mm``'s output, with ``add`` merged into that constant."""
        sole = g.sole_consumer(mm.output[0], g.describe(mm))
        if isinstance(sole, str) or sole[0].op_type != "Add" or sole[0].domain not in ("", "ai.onnx"):
            return None
        node, index = sole
        bias = g.constant(node.input[1 - index], "bias", node)
        if isinstance(bias, str):
            return None
        try:
            return node, 1 - index, bias, squeeze_rows(bias_rows(bias, 1.0, add.shape[0]) + add)
        except ValueError:  # does not broadcast like a per-feature bias: insert a new Add instead
            return None

    def _append_add(self, g: Graph, mm: onnx.NodeProto, bias: np.ndarray, elem_type: int, out: str) -> None:
        bias_name = g.add_initializer(bias, elem_type, f"{node_id(mm)}_bias")
        add = helper.make_node("Add", [mm.output[0], bias_name], [out], name=g.fresh(f"{node_id(mm)}_bias_add"))
        g.insert_after(mm, add)
