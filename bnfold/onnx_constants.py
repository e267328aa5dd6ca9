"""Fold constant subgraphs of an ONNX graph into initializers.

A node is *constant* when every input it names is a constant: an initializer that is not also a
graph input (a graph input may override it at run time), or an output of a node already found
constant. Such a node computes the same tensors on every request, so it is evaluated once here
with ``onnx.reference.ReferenceEvaluator`` (numpy only: no torch, no onnxruntime) and replaced by
initializers holding its outputs. ``Constant`` nodes become initializers the same way.

The TorchScript exporter needs this for ``F.pad(mode="replicate")``: it writes the ``pads`` input
as a chain of Constant, ConstantOfShape, Concat, Reshape, Slice, Transpose and Cast nodes that
its own ``do_constant_folding`` leaves in place; onnxruntime with optimizations off then runs
the chain on every request.

A constant node is kept (and everything depending on it stays unfolded) when

* its op is not in the default domain (its semantics are not the reference evaluator's),
* its op is random (``RandomNormal*``, ``RandomUniform*``, ``Multinomial``, ``Bernoulli``),
* it has a subgraph attribute (``If``, ``Loop``, ``Scan``: the body may read outer values),
* it produces a graph output (graph outputs stay node outputs),
* an output is not a tensor (sequences, optionals) or is larger than ``max_bytes``: folding
  must never blow up the file (``Expand`` or ``ConstantOfShape`` can make large tensors).

Afterwards, initializers no node, subgraph or graph output uses are removed (initializers that
are also graph inputs are left alone), and the result must pass the full ONNX checker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.errors import BnfoldError

MAX_BYTES = 1 << 20  # 1 MiB per folded tensor
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass
class ConstantFolding:
    """Result of :func:`fold_constants`: the new model, the folded nodes' op types, and kept
    constant nodes with the reason each was kept."""

    model: onnx.ModelProto
    folded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def fold_constants(model: onnx.ModelProto, *, max_bytes: int = MAX_BYTES) -> ConstantFolding:
    """Replace every foldable constant node of ``model``'s main graph by initializers (see module doc).

    ``model`` is not modified. Precondition: the graph's nodes are in topological order (the ONNX
    checker requires it). Raises :class:`BnfoldError` if the result fails the full ONNX checker.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph_inputs = {v.name for v in graph.input}
    graph_outputs = {v.name for v in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    constants = {name for name in initializers if name not in graph_inputs}
    opsets = list(out.opset_import)
    values: dict[str, np.ndarray] = {}
    result = ConstantFolding(out)
    new_nodes: list[onnx.NodeProto] = []
    new_tensors: list[onnx.TensorProto] = []
    for node in graph.node:
        reason = _check(node, constants, graph_outputs)
        if reason is None:
            outputs, reason = _evaluate(node, [_value(n, values, initializers) for n in node.input], opsets, max_bytes)
        if reason is not None:
            if all(not name or name in constants for name in node.input):
                result.kept[node.name or node.op_type] = reason
            new_nodes.append(node)
            continue
        for name, array in zip(node.output, outputs, strict=True):
            if name:
                values[name] = array
                constants.add(name)
                new_tensors.append(numpy_helper.from_array(array, name))
        result.folded.append(node.op_type)
    if not result.folded:
        return result
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_tensors)
    folded_names = {t.name for t in new_tensors}
    kept_info = [v for v in graph.value_info if v.name not in folded_names]  # initializers carry their type
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    _remove_unused_initializers(graph, graph_inputs)
    try:
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnfoldError(f"folding constants broke the model: {' '.join(str(exc).split())[:300]}") from exc
    return result


def _check(node: onnx.NodeProto, constants: set[str], graph_outputs: set[str]) -> str | None:
    """None if ``node`` may be folded, else why not."""
    if node.domain not in _DEFAULT_DOMAINS:
        return f"op {node.domain}::{node.op_type} is not in the default ONNX domain"
    if node.op_type in RANDOM_OPS:
        return f"op {node.op_type} is random"
    if any(a.type in _SUBGRAPH_TYPES for a in node.attribute):
        return f"op {node.op_type} has a subgraph"
    missing = [name for name in node.input if name and name not in constants]
    if missing:
        return f"inputs {missing} are not constants"
    produced = [name for name in node.output if name in graph_outputs]
    if produced:
        return f"it produces graph outputs {produced}"
    return None


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], opsets: list[onnx.OperatorSetIdProto],
              max_bytes: int) -> tuple[list[np.ndarray], str | None]:
    """Run ``node`` alone with the reference evaluator; (outputs, None) or ([], reason)."""
    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    single = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                              domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "node", [helper.make_value_info(n, onnx.TypeProto()) for n in names if n],
                              [helper.make_value_info(n, onnx.TypeProto()) for n in single.output])
    feeds = {n: v for n, v in zip(names, inputs, strict=True) if n}
    try:
        outputs = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, feeds)
    except Exception as exc:  # the reference evaluator raises many types for ops it lacks
        return [], f"the reference evaluator cannot run it ({type(exc).__name__}: {str(exc)[:120]})"
    arrays: list[np.ndarray] = []
    for name, value in zip(node.output, outputs, strict=True):
        if not isinstance(value, np.ndarray):
            return [], f"output {name!r} is a {type(value).__name__}, not a tensor"
        if value.nbytes > max_bytes:
            return [], f"output {name!r} has {value.nbytes} bytes, more than the cap of {max_bytes}"
        arrays.append(value)
    return arrays, None


def _value(name: str, values: dict[str, np.ndarray], initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if not name:
        return None
    if name not in values:
        values[name] = numpy_helper.to_array(initializers[name])
    return values[name]


def _used_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every value name the nodes read, including reads from inside their subgraphs."""
    used: set[str] = set()
    for node in nodes:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                used |= _used_names(sub.node)
                used.update(v.name for v in sub.output)
    return used


def _remove_unused_initializers(graph: onnx.GraphProto, graph_inputs: set[str]) -> None:
    used = _used_names(graph.node) | {v.name for v in graph.output} | graph_inputs
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
