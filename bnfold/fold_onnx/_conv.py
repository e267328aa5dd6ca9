"""Conv and ConvTranspose.

Conv weight ``(M, C/g, k...)``: a following BN scales axis 0; a preceding BN scales axis 1 (grouped)
and is exact only without zero padding (explicit ``pads`` or ``auto_pad=SAME_*`` with a kernel > 1).
ConvTranspose weight ``(C, M/g, k...)``: a following BN scales axis 1 (grouped); a preceding BN scales
axis 0 and is exact only when its shift is zero (border outputs see fewer taps).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.arith import Affine, input_side_exactness
from bnfold.fold_onnx._graph import node_id
from bnfold.fold_onnx._rewrite import WeightLayer, node_attrs


class ConvFold(WeightLayer):
    op_type = "Conv"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 0, 1

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        return {"axis": 1, "out_axis": 0, "groups": int(node_attrs(node).get("group", 1))}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        attrs = node_attrs(node)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(k != 1 for k in w.shape[2:]):
            if input_side_exactness(bn, pads=(1,)) is None:  # padded, but the shift is zero: exact
                return None
            return (f"folding a batch norm into the following Conv '{node_id(node)}' is not exact with "
                    f"auto_pad={auto_pad}: the zero-padded border would see the shift; use pads=0")
        pads = tuple(attrs.get("pads", ())) if auto_pad == "NOTSET" else ()
        return input_side_exactness(bn, pads=pads)


class ConvTransposeFold(WeightLayer):
    op_type = "ConvTranspose"

    def out_axis(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, int(node_attrs(node).get("group", 1))

    def in_axes(self, node: onnx.NodeProto, w: np.ndarray) -> dict[str, int]:
        groups = int(node_attrs(node).get("group", 1))
        return {"axis": 0, "out_axis": 1, "groups": groups, "out_channels": int(w.shape[1]) * groups}

    def before_problem(self, node: onnx.NodeProto, w: np.ndarray, bn: Affine) -> str | None:
        return input_side_exactness(bn, transposed=True)
