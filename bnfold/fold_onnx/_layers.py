"""Which rewrite handles which layer. One module per layer kind (``_conv``, ``_gemm``, ``_matmul``,
on the shared base in ``_rewrite``): each matches the layer next to a batch norm, checks that folding
is exact (returning the reason when it is not), and returns the rewrite as a closure.

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

from bnfold.fold_onnx._conv import ConvFold, ConvTransposeFold
from bnfold.fold_onnx._gemm import GemmFold
from bnfold.fold_onnx._matmul import MatMulFold
from bnfold.fold_onnx._rewrite import Rewrite, WeightLayer

__all__ = ["AFTER", "BEFORE", "Rewrite"]

# op type of the layer next to the BN -> its rewrite ("Add": the bias Add of a MatMul)
AFTER: dict[str, WeightLayer | MatMulFold] = {
    "Conv": ConvFold(), "ConvTranspose": ConvTransposeFold(), "Gemm": GemmFold(),
    "MatMul": MatMulFold(), "Add": MatMulFold(),
}
BEFORE: dict[str, WeightLayer | MatMulFold] = {
    "Conv": ConvFold(), "ConvTranspose": ConvTransposeFold(), "Gemm": GemmFold(), "MatMul": MatMulFold(),
}
