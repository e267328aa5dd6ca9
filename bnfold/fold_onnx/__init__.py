"""Fold ONNX ``BatchNormalization`` nodes into the neighbouring Conv, ConvTranspose, Gemm or MatMul.

At inference a BN is the per-channel affine map ``bn(x) = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` along axis 1. A linear
layer absorbs it exactly (the algebra is in :mod:`bnfold.arith`, the only place it lives):

* BN after the layer: ``W' = scale * W`` along the output-channel axis, ``b' = scale * b + shift``;
* BN before the layer: ``W' = W * scale`` along the input-channel axis, ``b' = b + sum W * shift``,
  exact only when every output sees every kernel tap of real input (no zero padding, not transposed)
  or the shift is zero.

For each BN (in graph order) the pass tries the producer of its input first, then the sole consumer
of its output. Each try is match + check + rewrite (:mod:`bnfold.fold_onnx._layers`): the check
refuses, with a reason, whenever the intermediate value has another use or is a graph output, a
weight/bias/BN parameter is not a constant, the channel counts or ranks disagree, or the fold would
not be exact. A refused BN stays in the graph and its reasons go to :attr:`FoldResult.skipped`.
Constants shared with other nodes are copied, never edited in place; constants the rewrite orphaned
are removed. Nodes inside subgraphs (If/Loop/Scan bodies) are left as they are.

Graph inputs are what a caller may feed, so a value listed there is not a constant, even with an
initializer behind it (IR >= 4: the initializer is only a default). IR < 4 is the exception: there
every initializer must be listed as a graph input, so the listing is read as the storage rule it is
and the initializers fold as constants; the result again lists every initializer as a graph input
(see :mod:`._graph`).
"""

from __future__ import annotations

import onnx

from bnfold.fold_onnx._batchnorm import is_batchnorm, read_batchnorm
from bnfold.fold_onnx._graph import Graph, node_id, subgraphs
from bnfold.fold_onnx._layers import AFTER, BEFORE, Rewrite
from bnfold.result import Folded, FoldResult, Skipped

__all__ = ["fold_onnx"]

_LAYERS = "Conv, ConvTranspose, Gemm, MatMul and MatMul+Add"


def fold_onnx(model: onnx.ModelProto) -> FoldResult[onnx.ModelProto]:
    """Fold every BatchNormalization that can be folded exactly; keep the others with a reason.

    ``model`` is not modified. The result has the same graph inputs (below IR 4, where the inputs
    list every initializer, they follow the folded initializers), outputs, opset imports and
    metadata; every BN of the model appears once in ``folded`` or ``skipped``.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"fold_onnx expects an onnx.ModelProto, got {type(model).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    result: FoldResult[onnx.ModelProto] = FoldResult(model=out)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), None)
    g = Graph(out.graph, lambda: _ranks(model), out.ir_version)  # value names keep their ranks through the rewrites
    for bn in [n for n in out.graph.node if is_batchnorm(n)]:
        outcome = _fold_one(g, bn, opset)
        if isinstance(outcome, Folded):
            result.folded.append(outcome)
        else:
            result.skipped.append(outcome)
    g.finish()
    if g.dropped_inputs:
        result.notes.append(
            f"IR version {out.ir_version} lists every initializer as a graph input: the {len(g.dropped_inputs)} "
            f"initializers the fold used up were removed with their graph inputs "
            f"({', '.join(sorted(g.dropped_inputs))}), and the new ones were listed as graph inputs"
        )
    for function in out.functions:  # model-local functions: a body can be called from several places
        result.skipped += [
            Skipped(node_id(bn), f"it is inside the model-local function '{function.domain}.{function.name}'; "
                    "inline the functions first (onnx.inliner.inline_local_functions)")
            for node in function.node for bn in [node, *_nested_batchnorms_of(node)] if is_batchnorm(bn)
        ]
    for node in out.graph.node:
        for sub in subgraphs(node):
            result.skipped += [
                Skipped(node_id(bn), f"it is inside a subgraph of {node.op_type} '{node_id(node)}'; folding inside "
                        "control-flow bodies is not supported")
                for bn in _nested_batchnorms(sub)
            ]
    return result


def _fold_one(g: Graph, bn: onnx.NodeProto, opset: int | None) -> Folded | Skipped:
    name = node_id(bn)
    if opset is None:
        return Skipped(name, "the model imports no default-domain (ai.onnx) opset")
    affine = read_batchnorm(g, bn, opset)
    if isinstance(affine, str):
        return Skipped(name, affine)

    after: str | Rewrite
    before: str | Rewrite
    producer = g.producer.get(bn.input[0])
    if producer is None:
        after = f"its input '{bn.input[0]}' is not computed by a layer"
    elif producer.op_type not in AFTER or producer.domain not in ("", "ai.onnx"):
        after = f"its input comes from {g.describe(producer)}; only {_LAYERS} absorb a following batch norm"
    else:
        rule = AFTER[producer.op_type]
        sole = g.sole_consumer(bn.input[0], g.describe(producer))
        after = sole if isinstance(sole, str) else rule.fold_after(g, producer, affine, bn)
        if not isinstance(after, str):
            into = node_id(rule.layer_of(g, producer))
            after()
            return Folded(bn=name, into=into, side="output")

    consumer = g.sole_consumer(bn.output[0], "its")
    if isinstance(consumer, str):
        before = consumer
    else:
        node, index = consumer
        if node.op_type not in BEFORE or node.domain not in ("", "ai.onnx"):
            before = (f"its output goes to {g.describe(node)}; only Conv, ConvTranspose, Gemm and MatMul "
                      "absorb a preceding batch norm")
        else:
            before = BEFORE[node.op_type].fold_before(g, node, index, affine, bn)
            if not isinstance(before, str):
                into = node_id(node)
                before()
                return Folded(bn=name, into=into, side="input")
    return Skipped(name, f"cannot fold into the layer before it: {after}; nor into the layer after it: {before}")


def _nested_batchnorms_of(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    return [bn for sub in subgraphs(node) for bn in _nested_batchnorms(sub)]


def _nested_batchnorms(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for node in graph.node:
        if is_batchnorm(node):
            found.append(node)
        for sub in subgraphs(node):
            found += _nested_batchnorms(sub)
    return found


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor rank of every value whose shape is known, using ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: a model it rejects still folds where ranks are not needed
        inferred = model
    g = inferred.graph
    ranks = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        tensor = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor.HasField("shape"):
            ranks[vi.name] = len(tensor.shape.dim)
    for init in g.initializer:
        ranks.setdefault(init.name, len(init.dims))
    return ranks
