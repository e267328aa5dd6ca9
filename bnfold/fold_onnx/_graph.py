"""A mutable view of one ONNX graph for the rewrites: who produces and who consumes each value,
which values are constants, and the few edits a fold needs (replace a constant, rewire, remove).

Constants are initializers and outputs of ``Constant`` nodes, except what a caller can feed:

* IR >= 4: an initializer that is also listed in ``graph.input`` (``torch.onnx.export(...,
  keep_initializers_as_inputs=True)``) is only a default the caller can override at run time, so it
  is not a constant. Folding it would bake the default in and drop the input a caller may feed.
* IR < 4: every initializer must be listed in ``graph.input`` (the only way such a model can store
  a weight), so the listing says nothing and the initializer is a constant; onnxruntime agrees and
  accepts no feed for it. The graph inputs then follow the initializers: new ones are listed (with
  their type and shape) and the input of one the fold removed goes with it. Such an initializer is
  still never edited in place: a runtime that does let a caller feed it then reports an unknown
  input instead of silently ignoring the override.

A rewrite never edits a constant that has another user: it writes a private copy under a fresh name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# From this IR version on an initializer need not be a graph input (onnx.IR_VERSION_2019_1_22).
IR_INITIALIZERS_APART = 4

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class Const:
    """A constant value: its name, its array (float64) and its ONNX element type."""

    name: str
    value: np.ndarray
    elem_type: int


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_used_inside(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from (name for name in node.input if name)
        for sub in subgraphs(node):
            yield from _names_used_inside(sub)
    yield from (out.name for out in graph.output)


def _all_names(graph: onnx.GraphProto) -> Iterator[str]:
    for group in (graph.input, graph.output, graph.value_info):
        yield from (v.name for v in group)
    yield from (t.name for t in graph.initializer)
    yield from (t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
        for sub in subgraphs(node):
            yield from _all_names(sub)


class Graph:
    """Index over ``graph``, edited in place through the methods below; :meth:`finish` at the end."""

    def __init__(self, graph: onnx.GraphProto, ranks: Callable[[], dict[str, int]], ir_version: int) -> None:
        self.graph = graph
        # IR < 4 lists every initializer as a graph input; ir_version 0 (unset) is read as a current one.
        self.inputs_list_initializers = 0 < ir_version < IR_INITIALIZERS_APART
        self._rank_source = ranks  # value name -> tensor rank; called once, on first need
        self._ranks: dict[str, int] | None = None
        self._taken = set(_all_names(graph))
        self.orphan_candidates: set[str] = set()  # constants a rewrite stopped using
        # Nodes unlinked by remove_node, held so their wrappers (compared by identity) stay alive.
        self._removed: list[onnx.NodeProto] = []
        self._gone: set[str] = set()  # values (and initializers) that may no longer exist
        self.dropped_inputs: list[str] = []  # initializer-backed graph inputs a fold left unused (IR < 4)
        self._created: list[str] = []  # initializers added by add_initializer
        self.reindex()

    def reindex(self) -> None:
        g = self.graph
        self.inputs = {v.name for v in g.input}
        self.outputs = {v.name for v in g.output}
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.uses: Counter[str] = Counter()  # node inputs, subgraph references and graph outputs
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
                    self.uses[name] += 1
            for sub in subgraphs(node):
                self.uses.update(set(_names_used_inside(sub)))
        self.uses.update(self.outputs)

    # -- questions -------------------------------------------------------------------------

    def rank(self, name: str) -> int | None:
        """The rank of value ``name`` if shape inference knows it (run lazily: only MatMul needs it)."""
        if self._ranks is None:
            self._ranks = self._rank_source()
        return self._ranks.get(name)

    def describe(self, node: onnx.NodeProto) -> str:
        return f"{node.op_type} '{node_id(node)}'"

    def overridable(self, name: str) -> bool:
        """Whether a caller can feed ``name``: a graph input, unless it is an initializer below IR 4."""
        return name in self.inputs and not (self.inputs_list_initializers and name in self.initializers)

    def constant(self, name: str, role: str, owner: onnx.NodeProto | None = None) -> Const | str:
        """The constant ``name`` or the reason it is not one, naming it as ``role`` of ``owner``."""
        subject = f"{role} '{name}'" + (f" of {self.describe(owner)}" if owner is not None else "")
        if self.overridable(name) and name not in self.initializers:
            return f"{subject} is a graph input, so it can change at run time; it must be a constant initializer"
        if self.overridable(name):
            return (f"{subject} is a graph input, so a caller can override its initializer at run time: it is not "
                    "a constant (to fold it, remove it from graph.input, e.g. export with "
                    "keep_initializers_as_inputs=False)")
        if name in self.initializers:
            tensor = self.initializers[name]
        else:
            node = self.producer.get(name)
            if node is None:
                return f"{subject} is not produced by any node or initializer"
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                # Exporters emit Identity over initializers (torch.onnx without constant folding).
                inner = self.constant(node.input[0], role, owner)
                return inner if isinstance(inner, str) else Const(name, inner.value, inner.elem_type)
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                return f"{subject} is computed by {self.describe(node)} at run time, not a constant"
            tensor = _constant_tensor(node)
            if tensor is None:
                return f"{subject} comes from a Constant node without a dense float value"
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return (f"{subject} is stored as external data; load the model with "
                    "onnx.load(path, load_external_data=True)")
        if tensor.data_type not in _FLOAT_TYPES:
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type)
            return f"{subject} has element type {dtype}; only float16/bfloat16/float/double fold"
        value = numpy_helper.to_array(tensor).astype(np.float64)
        return Const(name=name, value=value, elem_type=tensor.data_type)

    def sole_consumer(self, name: str, owner: str) -> tuple[onnx.NodeProto, int] | str:
        """The one node input reading ``name``, or why the value has to stay as it is."""
        if name in self.outputs:
            return f"{owner} output '{name}' is a graph output, so it must stay unchanged"
        users = self.consumers.get(name, [])
        if self.uses[name] != 1 or len(users) != 1:
            others = ", ".join(sorted({self.describe(n) for n, _ in users})) or "a subgraph"
            return (f"{owner} output '{name}' has {self.uses[name]} uses ({others}), so it must stay "
                    "unchanged")
        return users[0]

    # -- edits -----------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        """A name not used anywhere in the model, derived from ``base``."""
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def set_constant(self, node: onnx.NodeProto, index: int, value: np.ndarray, elem_type: int, base: str) -> None:
        """Make ``node.input[index]`` a constant holding ``value`` (cast to ``elem_type``).

        An initializer used only here is overwritten under its own name; anything else (shared
        initializer, one listed as a graph input, Constant node, missing optional input) gets a new
        initializer with a fresh name.
        """
        old = node.input[index] if index < len(node.input) else ""
        if old in self.initializers and self.uses[old] == 1 and old not in self.inputs:
            arr = value.astype(helper.tensor_dtype_to_np_dtype(elem_type))
            self.initializers[old].CopyFrom(numpy_helper.from_array(arr, old))
            return
        self.set_input(node, index, self.add_initializer(value, elem_type, old or base))

    def add_initializer(self, value: np.ndarray, elem_type: int, base: str) -> str:
        """Add a new initializer holding ``value`` cast to ``elem_type``; return its fresh name."""
        name = self.fresh(f"{base}_bnfold")
        arr = value.astype(helper.tensor_dtype_to_np_dtype(elem_type))
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        self.initializers[name] = self.graph.initializer[-1]
        self._created.append(name)
        return name

    # The edits below keep the index current, so a pass needs no reindex between rewrites.

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        self._unuse(node, index)
        node.input[index] = name
        if name:
            self.consumers.setdefault(name, []).append((node, index))
            self.uses[name] += 1

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        old = node.output[index]
        if self.producer.get(old) is node:
            del self.producer[old]
        self._gone.add(old)
        node.output[index] = name
        self.producer[name] = node

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        nodes = self.graph.node
        position = next(i for i, n in enumerate(nodes) if n is anchor)
        nodes.insert(position + 1, node)
        node = nodes[position + 1]  # the container holds a copy
        for i, name in enumerate(node.input):
            if name:
                self.consumers.setdefault(name, []).append((node, i))
                self.uses[name] += 1
        self.producer.update((out, node) for out in node.output if out)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Unlink ``node`` now; it leaves ``graph.node`` in :meth:`finish`."""
        for i in range(len(node.input)):
            self._unuse(node, i)
        for out in node.output:
            if self.producer.get(out) is node:
                del self.producer[out]
            self._gone.add(out)
        self._removed.append(node)

    def _unuse(self, node: onnx.NodeProto, index: int) -> None:
        old = node.input[index]
        if old:
            self.consumers[old] = [(n, i) for n, i in self.consumers.get(old, []) if not (n is node and i == index)]
            self.uses[old] -= 1
            self.orphan_candidates.add(old)

    def finish(self) -> None:
        """Drop removed nodes, the initializers and Constant nodes the rewrites orphaned (never
        anything else), and value_info of values that no longer exist; below IR 4, list the new
        initializers as graph inputs and drop the inputs of the removed ones."""
        pending = sorted(self.orphan_candidates)
        while pending:  # removing an Identity can orphan its input in turn
            name = pending.pop()
            if self.uses[name] > 0 or self.overridable(name):
                continue
            if name in self.inputs:
                self.dropped_inputs.append(name)
            node = self.producer.get(name)
            if node is not None and node.op_type in ("Constant", "Identity") and len(node.output) == 1:
                self.remove_node(node)
                pending.extend(n for n in node.input if n)
            if name in self.initializers:
                self._gone.add(name)
                del self.initializers[name]
        g = self.graph
        removed = {id(n) for n in self._removed}
        _delete_where(g.node, lambda n: id(n) in removed)
        _delete_where(g.input, lambda v: v.name in self.dropped_inputs)
        _delete_where(g.initializer, lambda t: t.name in self._gone and t.name not in self.initializers)
        if self.inputs_list_initializers:
            g.input.extend(helper.make_tensor_value_info(name, t.data_type, t.dims)
                           for name in self._created if (t := self.initializers.get(name)) is not None)
        alive = (self.inputs - set(self.dropped_inputs)) | set(self.initializers) | set(self.producer)
        _delete_where(g.value_info, lambda v: v.name in self._gone and v.name not in alive)
        self.orphan_candidates.clear()
        self._removed.clear()
        self._created.clear()
        self.reindex()


def _delete_where(field: Any, doomed: Callable[[Any], bool]) -> None:
    for i in reversed([i for i, item in enumerate(field) if doomed(item)]):
        del field[i]


def node_id(node: onnx.NodeProto) -> str:
    """The node's name, or its first output when it has none."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
    return None
