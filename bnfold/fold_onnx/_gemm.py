"""Gemm: ``Y = alpha * A' B' + beta * C`` with ``B'`` = B or B^T.

Output channels are axis 1 of B (transB=0) or axis 0 (transB=1). After a fold ``beta`` is 1 and
``C`` holds the whole constant term (any of its broadcast shapes, kept per row when it varies by row):

* BN after:  ``B'' = B' * scale`` per output column, ``C' = scale * (beta C) + shift``;
* BN before (transA=0 only; with transA=1 the BN's channels are output rows):
  ``B'' = diag(scale) B'``, ``C' = beta C + alpha * (shift B')``.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.arith import Affine, fold_input_side, fold_output_side
from bnfold.fold_onnx._graph import Const, node_id
from bnfold.fold_onnx._rewrite import Pair, WeightLayer, affine_rows, bias_rows, node_attrs, set_attr, squeeze_rows


class GemmFold(WeightLayer):
    op_type = "Gemm"
    bias_role = "C"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return (0 if node_attrs(node).get("transB", 0) else 1), 1

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        return {"axis": 1, "out_axis": 0} if node_attrs(node).get("transB", 0) else {"axis": 0, "out_axis": 1}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        if node_attrs(node).get("transA", 0):
            return (f"Gemm '{node_id(node)}' has transA=1, so the batch norm's channels are the output "
                    "rows, not the contracted axis")
        return None

    def _alpha_beta(self, node: onnx.NodeProto) -> tuple[float, float]:
        attrs = node_attrs(node)
        return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))

    def fold_bias_after(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        beta = self._alpha_beta(node)[1]
        w_new, _ = fold_output_side(w, None, bn, axis=self.out_axis(node)[0])
        return w_new, squeeze_rows(affine_rows(bias_rows(b, beta, bn.channels), bn))

    def fold_bias_before(self, node: onnx.NodeProto, w: np.ndarray, b: Const | None, bn: Affine) -> Pair:
        alpha, beta = self._alpha_beta(node)
        w_new, add = fold_input_side(w, None, bn, **self.in_axes(node, w))
        return w_new, squeeze_rows(bias_rows(b, beta, add.shape[0]) + alpha * add)

    def finish(self, node: onnx.NodeProto) -> None:
        set_attr(node, "beta", 1.0)
