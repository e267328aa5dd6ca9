"""What every layer rewrite shares: the base class for layers with weight and optional bias
(match + check returning a reason + rewrite closure, with hooks for where the channels live),
and the small graph edits that retire a folded batch norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper

from bnfold.arith import Affine, fold_input_side, fold_output_side
from bnfold.fold_onnx._graph import Const, Graph, node_id

Rewrite = Callable[[], None]
Pair = tuple[np.ndarray, np.ndarray]


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def take_over_output(g: Graph, node: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    """``node`` now writes the BN's output; the BN and the intermediate value disappear."""
    g.set_output(node, 0, bn.output[0])
    g.remove_node(bn)


def bypass(g: Graph, node: onnx.NodeProto, index: int, bn: onnx.NodeProto) -> None:
    """``node`` now reads the BN's input; the BN and its output disappear."""
    g.set_input(node, index, bn.input[0])
    g.remove_node(bn)


def bias_rows(bias: Const | None, factor: float, n: int) -> np.ndarray:
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


def affine_rows(rows: np.ndarray, bn: Affine) -> np.ndarray:
    """Apply the BN to each row of a constant term (via the shared output-side arithmetic)."""
    scaled, shift = fold_output_side(rows.T, None, bn, axis=0)
    return scaled.T + shift


def squeeze_rows(rows: np.ndarray) -> np.ndarray:
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
        return self._rewrite(g, node, w, b, w_new, b_new, lambda: take_over_output(g, node, bn_node))

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
        return self._rewrite(g, node, w, b, w_new, b_new, lambda: bypass(g, node, 0, bn_node))

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
