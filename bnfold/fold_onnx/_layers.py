"""One rewrite per layer kind: match the layer next to a batch norm, check that folding is exact
(returning the reason when it is not), and return the rewrite as a closure.

Where the BN's channels live in each weight (the only real difference between the layers)::

    layer                          weight shape        BN after: axis (groups)   BN before: axis -> out axis
    Conv                           (M, C/g, k...)      0                          1 (g) -> 0
    ConvTranspose                  (C, M/g, k...)      1 (g)                      0 -> 1 (g, M)
    Gemm transB=0 / MatMul         (K, N)              1                          0 -> 1
    Gemm transB=1                  (N, K)              0                          1 -> 0

Gemm computes ``alpha * A B' + beta * C``. After the fold ``beta`` is 1 and ``C`` holds the whole
constant term: BN after: ``C' = scale * (beta C) + shift``; BN before: ``C' = beta C + alpha (B'^T shift)``.
MatMul has no bias: it is folded together with a following ``Add`` of a constant, or a new ``Add``
is inserted. BN normalizes axis 1 while MatMul contracts/produces the *last* axis, so MatMul folds
only when that tensor is 2-D (checked with shape inference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper

from bnfold.arith import Affine, fold_input_side, fold_output_side, input_side_exactness
from bnfold.fold_onnx._graph import Const, Graph, node_id

Rewrite = Callable[[], None]
Pair = tuple[np.ndarray, np.ndarray]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def _take_over_output(g: Graph, node: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    """``node`` now writes the BN's output; the BN and the intermediate value disappear."""
    g.drop_value_info(node.output[0])
    node.output[0] = bn.output[0]
    g.remove_node(bn)


def _bypass(g: Graph, node: onnx.NodeProto, index: int, bn: onnx.NodeProto) -> None:
    """``node`` now reads the BN's input; the BN and its output disappear."""
    g.drop_value_info(bn.output[0])
    node.input[index] = bn.input[0]
    g.remove_node(bn)


def _bias_rows(bias: Const | None, factor: float, n: int) -> np.ndarray:
    """``factor * bias`` as an ``(R, n)`` array, R = 1 or the number of rows it varies over.

    ``bias`` must broadcast to ``(rows, n)`` (a Gemm ``C`` or a MatMul's Add operand).
    """
    if bias is None:
        return np.zeros((1, n))
    value = bias.value * factor
    if value.ndim > 2:
        raise ValueError(f"bias '{bias.name}' has shape {value.shape}; it would raise the output rank above 2")
    rows = value.reshape(1, -1) if value.ndim < 2 else value
    try:
        return np.broadcast_to(rows, (rows.shape[0], n))
    except ValueError:
        raise ValueError(f"bias '{bias.name}' of shape {value.shape} does not broadcast to {n} channels") from None


def _affine_rows(rows: np.ndarray, bn: Affine) -> np.ndarray:
    """Apply the BN to each row of a constant term (via the shared output-side arithmetic)."""
    scaled, shift = fold_output_side(rows.T, None, bn, axis=0)
    return scaled.T + shift


def _squeeze_rows(rows: np.ndarray) -> np.ndarray:
    return rows[0] if rows.shape[0] == 1 else rows


class WeightLayer:
    """A layer with weight at input 1 and optional bias at input 2 (Conv, ConvTranspose, Gemm).

    Subclasses provide the axis hooks and, for Gemm, their own bias arithmetic.
    """

    op_type: ClassVar[str]
    bias_role: ClassVar[str] = "bias"

    # -- hooks -----------------------------------------------------------------------------

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(weight axis holding output channels, groups along it)."""
        raise NotImplementedError

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        """Keyword arguments of :func:`fold_input_side` for this layout."""
        raise NotImplementedError

    def out_channels(self, node: onnx.NodeProto, w: np.ndarray) -> int:
        axis, groups = self.out_axis(node)
        return int(w.shape[axis]) * groups

    def in_channels(self, node: onnx.NodeProto, w: np.ndarray) -> int:
        kw = self.in_axes(node, w)
        return int(w.shape[kw["axis"]]) * (kw.get("groups", 1) if kw["axis"] == 1 else 1)

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        """Why folding a preceding BN would not be exact, or None."""
        return None

    def fold_bias_after(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        axis, groups = self.out_axis(node)
        return fold_output_side(w, None if b is None else b.value, bn, axis=axis, groups=groups)

    def fold_bias_before(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        return fold_input_side(w, None if b is None else b.value, bn, **self.in_axes(node, w))

    def layer_of(self, g: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
        return node

    def finish(self, node: onnx.NodeProto) -> None:
        """Attribute edits after the constants are rewritten (Gemm: beta = 1)."""

    # -- match + check, returning the rewrite ------------------------------------------------

    def _operands(self, g: Graph, node: onnx.NodeProto) -> tuple[Const, Const | None] | str:
        w = g.constant(node.input[1], "weight", node)
        if isinstance(w, str):
            return w
        if len(node.input) < 3 or not node.input[2]:
            return w, None
        b = g.constant(node.input[2], self.bias_role, node)
        return b if isinstance(b, str) else (w, b)

    def fold_after(self, g: Graph, node: onnx.NodeProto, bn: Affine, bn_node: onnx.NodeProto) -> Rewrite | str:
        operands = self._operands(g, node)
        if isinstance(operands, str):
            return operands
        w, b = operands
        n = self.out_channels(node, w.value)
        if n != bn.channels:
            return f"{g.describe(node)} has {n} output channels but the batch norm has {bn.channels}"
        try:
            w_new, b_new = self.fold_bias_after(node, w.value, b, bn)
        except ValueError as err:
            return str(err)
        return self._rewrite(g, node, w, b, w_new, b_new, lambda: _take_over_output(g, node, bn_node))

    def fold_before(
        self, g: Graph, node: onnx.NodeProto, index: int, bn: Affine, bn_node: onnx.NodeProto
    ) -> Rewrite | str:
        if index != 0:
            return f"it feeds input {index} of {g.describe(node)} (a weight or bias), not its data input"
        operands = self._operands(g, node)
        if isinstance(operands, str):
            return operands
        w, b = operands
        problem = self.before_problem(node, w.value, bn)
        if problem:
            return problem
        n = self.in_channels(node, w.value)
        if n != bn.channels:
            return f"{g.describe(node)} has {n} input channels but the batch norm has {bn.channels}"
        try:
            w_new, b_new = self.fold_bias_before(node, w.value, b, bn)
        except ValueError as err:
            return str(err)
        return self._rewrite(g, node, w, b, w_new, b_new, lambda: _bypass(g, node, 0, bn_node))

    def _rewrite(
        self, g: Graph, node: onnx.NodeProto, w: Const, b: Const | None,
        w_new: np.ndarray, b_new: np.ndarray, rewire: Rewrite,
    ) -> Rewrite:
        def apply() -> None:
            g.set_constant(node, 1, w_new, w.elem_type, f"{node_id(node)}_weight")
            g.set_constant(node, 2, b_new, w.elem_type if b is None else b.elem_type, f"{node_id(node)}_bias")
            self.finish(node)
            rewire()

        return apply


class ConvFold(WeightLayer):
    op_type = "Conv"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 0, 1

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        return {"axis": 1, "out_axis": 0, "groups": int(_attrs(node).get("group", 1))}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        attrs = _attrs(node)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(k != 1 for k in w.shape[2:]):
            if input_side_exactness(bn, pads=(1,)) is None:
                return None
            return (f"folding a batch norm into the following Conv '{node_id(node)}' is not exact with "
                    f"auto_pad={auto_pad}: the zero-padded border would see the shift; use pads=0")
        pads = tuple(attrs.get("pads", ())) if auto_pad == "NOTSET" else ()
        return input_side_exactness(bn, pads=pads)


class ConvTransposeFold(WeightLayer):
    op_type = "ConvTranspose"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, int(_attrs(node).get("group", 1))

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        groups = int(_attrs(node).get("group", 1))
        return {"axis": 0, "out_axis": 1, "groups": groups, "out_channels": int(w.shape[1]) * groups}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        return input_side_exactness(bn, transposed=True)


class GemmFold(WeightLayer):
    op_type = "Gemm"
    bias_role = "C"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return (0 if _attrs(node).get("transB", 0) else 1), 1

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        return {"axis": 1, "out_axis": 0} if _attrs(node).get("transB", 0) else {"axis": 0, "out_axis": 1}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        if _attrs(node).get("transA", 0):
            return (f"Gemm '{node_id(node)}' has transA=1, so the batch norm's channels are the output "
                    "rows, not the contracted axis")
        return None

    def _alpha_beta(self, node: onnx.NodeProto) -> tuple[float, float]:
        attrs = _attrs(node)
        return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))

    def fold_bias_after(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        beta = self._alpha_beta(node)[1]
        w_new, _ = fold_output_side(w, None, bn, axis=self.out_axis(node)[0])
        return w_new, _squeeze_rows(_affine_rows(_bias_rows(b, beta, bn.channels), bn))

    def fold_bias_before(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        alpha, beta = self._alpha_beta(node)
        w_new, add = fold_input_side(w, None, bn, **self.in_axes(node, w))
        return w_new, _squeeze_rows(_bias_rows(b, beta, add.shape[0]) + alpha * add)

    def finish(self, node: onnx.NodeProto) -> None:
        _set_attr(node, "beta", 1.0)


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
        rank = g.ranks.get(name)
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
            b_new = _squeeze_rows(_affine_rows(_bias_rows(bias, 1.0, bn.channels), bn))
        except ValueError as err:
            return str(err)

        def apply() -> None:
            g.set_constant(mm, 1, w_new, w.elem_type, f"{node_id(mm)}_weight")
            if add is not None and bias is not None:
                g.set_constant(add, bias_index, b_new, bias.elem_type, f"{node_id(add)}_bias")
                _take_over_output(g, add, bn_node)
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
                mm.output[0] = g.fresh(f"{out}_matmul")
                self._append_add(g, mm, add, w.elem_type, out)
            _bypass(g, mm, 0, bn_node)

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
            return node, 1 - index, bias, _squeeze_rows(_bias_rows(bias, 1.0, add.shape[0]) + add)
        except ValueError:  # does not broadcast like a per-feature bias: insert a new Add instead
            return None

    def _append_add(self, g: Graph, mm: onnx.NodeProto, bias: np.ndarray, elem_type: int, out: str) -> None:
        bias_name = g.add_initializer(bias, elem_type, f"{node_id(mm)}_bias")
        add = helper.make_node("Add", [mm.output[0], bias_name], [out], name=g.fresh(f"{node_id(mm)}_bias_add"))
        g.insert_after(mm, add)


AFTER: dict[str, WeightLayer | MatMulFold] = {
    "Conv": ConvFold(), "ConvTranspose": ConvTransposeFold(), "Gemm": GemmFold(),
    "MatMul": MatMulFold(), "Add": MatMulFold(),
}
BEFORE: dict[str, WeightLayer | MatMulFold] = {
    "Conv": ConvFold(), "ConvTranspose": ConvTransposeFold(), "Gemm": GemmFold(), "MatMul": MatMulFold(),
}
