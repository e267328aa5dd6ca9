"""ONNX export of a PyTorch model, and reading/checking ONNX files.

:func:`export_model` uses torch's current exporter (``torch.onnx.export(..., dynamo=True)``) and
falls back to the deprecated TorchScript exporter (``dynamo=False``) only when that fails,
saying why in :attr:`Exported.fallback`; ``exporter="dynamo"`` or ``"torchscript"`` forces one.
Neither exporter may fold a batch norm on its own, outside bnfold's accounting: the dynamo
exporter runs with ``optimize=False`` (onnxscript's optimizer would fuse Conv+BatchNormalization)
and the TorchScript exporter with ``do_constant_folding=False`` (it fuses Conv+BatchNorm in eval
mode). Their output is then constant-folded without fusions (:func:`_fold_constants`: onnxscript's
``fold_constants`` and its ``Reshape`` shape materialization, then
:func:`bnfold.onnx_constants.fold_constants`), so every batch norm the PyTorch fold kept is a
``BatchNormalization`` node of the exported graph, for bnfold's ONNX fold to try next.

Measured on bnfold's folded digits CNN (the shipped ``cnn`` architecture, torch 2.13, onnxscript
0.7, onnx 1.23, 2 shared CPU cores, three exports per process): the dynamo exporter takes 1.4-3.3 s
per export (2.8-6.4 s for the first one in a process), the TorchScript exporter 0.2-0.7 s. Both
write 14 nodes and ~70 kB (one ``Pad``; dynamo writes ``ReduceMean`` + ``Reshape`` where
TorchScript writes ``GlobalAveragePool`` + ``Flatten``; TorchScript's replicate-padding constant
subgraph is folded by :mod:`bnfold.onnx_constants`). TorchScript honours opset 17; the dynamo
exporter writes 18, and :func:`_convert_down` converts to the opset asked for with the ONNX
version converter where it can: for this CNN it cannot (no ``Pad`` adapter from 18 to 17), nor
for a ``ReduceMean`` over the spatial axes (the converted node keeps an attribute opset 17 lacks
and fails the checker); a graph of Conv, BatchNormalization, Relu, Reshape and Gemm converts.
:attr:`Exported.opset` is the opset actually written, :attr:`Exported.opset_note` says why it is
higher than asked. Both exporters give a dynamic batch dimension (``dim_param="batch"``) and
stable input/output names.

Which PyTorch module each node came from is read off the export (:attr:`Exported.modules`,
:func:`module_paths`): the dynamo exporter's ``metadata_props["pkg.torch.onnx.name_scopes"]``,
else the initializers, which both exporters name by their ``state_dict`` keys
(``layer1.0.bn1.running_mean``). Node metadata is then removed: it holds stack traces that name
local files.
Every exported graph must pass ``onnx.checker.check_model(full_check=True)`` (which includes
shape inference).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from bnfold import onnx_constants
from bnfold.errors import BnfoldError
from bnfold.files import existing_file

Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
BATCH_DIM = "batch"
DYNAMO_OPSET = 18  # the lowest opset torch's dynamo exporter writes directly; below it converts down
_QUIET_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # they log a traceback when a conversion fails


@dataclass
class Exported:
    """An exported, checked ONNX model and how it was made."""

    model: onnx.ModelProto
    exporter: Literal["dynamo", "torchscript"]  # the exporter that wrote ``model``
    requested_opset: int
    fallback: str | None = None  # why the dynamo exporter was not used (exporter="auto" only)
    opset_note: str | None = None  # why the opset written differs from the one asked for
    modules: dict[str, str] = field(default_factory=dict)  # ONNX node name -> PyTorch module path

    @property
    def opset(self) -> int:
        """The default-domain opset written."""
        return opset_of(self.model)

    @property
    def notes(self) -> list[str]:
        return [n for n in (self.fallback, self.opset_note) if n]


def export_model(
    model: Any,
    input_shape: Sequence[int],
    *,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
    exporter: Exporter = "auto",
) -> Exported:
    """Export ``model`` (a ``torch.nn.Module``, run in eval mode) for inputs ``(batch, *input_shape)``.

    The batch dimension is dynamic (``dim_param="batch"``); the graph has one input and one output
    with the given names and passes the full ONNX checker. ``opset`` must be >= 17 (the dynamo
    exporter may write 18, see the module docstring). No batch norm is fused by the exporter; nodes
    that compute constants are folded into initializers. ``exporter="auto"`` tries dynamo, then
    TorchScript. Raises :class:`BnfoldError` if the exporter (every one tried) or the checker fails.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input_shape must be positive dimensions without the batch axis, got {list(input_shape)}")
    names = (input_name, output_name)
    if exporter == "torchscript":
        return _export(model, shape, opset, names, "torchscript")
    try:
        return _export(model, shape, opset, names, "dynamo")
    except BnfoldError as exc:
        if exporter == "dynamo":
            raise
        first = exc
    try:
        exported = _export(model, shape, opset, names, "torchscript")
    except BnfoldError as exc:
        raise BnfoldError(f"{_first_line(first)}; and the TorchScript fallback: {_first_line(exc)}") from exc
    exported.fallback = f"exported with the deprecated TorchScript exporter because {_first_line(first)}"
    return exported


def to_onnx(
    model: Any,
    input_shape: Sequence[int],
    *,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
    exporter: Exporter = "auto",
) -> onnx.ModelProto:
    """:func:`export_model`'s ONNX model alone (an unfolded model exports with its batch norms: no
    exporter fuses them)."""
    return export_model(model, input_shape, opset=opset, input_name=input_name, output_name=output_name,
                        exporter=exporter).model


def _export(model: Any, shape: tuple[int, ...], opset: int, names: tuple[str, str],
            exporter: Literal["dynamo", "torchscript"]) -> Exported:
    import torch

    example = torch.zeros((2, *shape), dtype=torch.float32)  # batch 2: nothing specializes to batch 1
    module_names = {name for name, _ in model.named_modules() if name}
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            if exporter == "dynamo":
                proto = _dynamo(model, example, opset, names)
            else:
                proto = _torchscript(model, example, opset, names)
            modules = module_paths(proto, module_names)
            for value in [*proto.graph.node, *proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
                del value.metadata_props[:]  # the dynamo exporter's stack traces name local files
            proto = _fold_constants(proto)
    except (BnfoldError, ValueError):
        raise
    except Exception as exc:  # the exporters raise many internal types
        raise BnfoldError(f"ONNX export ({exporter}) failed: {_first_line(exc)}") from exc
    finally:
        model.train(was_training)
    # Batch norms read the run-time input, so they are never folded here.
    proto = onnx_constants.fold_constants(proto).model
    proto, opset_note = _convert_down(proto, opset)
    proto.producer_name = "bnfold"
    check(proto, what=f"the {exporter} export")
    return Exported(proto, exporter, opset, opset_note=opset_note, modules=modules)


def _dynamo(model: Any, example: Any, opset: int, names: tuple[str, str]) -> onnx.ModelProto:
    """Export at opset >= 18, what the exporter writes; :func:`_convert_down` does the rest after
    constant folding (a constant ``ReduceMean`` axes input converts, a computed one does not)."""
    import torch

    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=max(opset, DYNAMO_OPSET), verbose=False,
        input_names=[names[0]], output_names=[names[1]],
        dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), optimize=False,
    )
    return program.model_proto  # type: ignore[union-attr]


def _convert_down(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, str | None]:
    """``model`` converted to ``opset`` if it has a higher one, else unchanged with the reason."""
    written = opset_of(model)
    if written <= opset:
        return model, None
    try:
        converted = onnx.version_converter.convert_version(model, opset)
        check(converted)
    except Exception as exc:  # the converter asserts, naming the op it has no adapter for
        why = _first_line(exc).rsplit("failed: ", 1)[-1].replace("$", "")
        return model, (f"the dynamo exporter wrote opset {written}, not the {opset} asked for: its graph does "
                       f"not convert down ({why})")
    return converted, None


def _torchscript(model: Any, example: Any, opset: int, names: tuple[str, str]) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    torch.onnx.export(
        model, (example,), buf, dynamo=False, opset_version=opset,  # type: ignore[arg-type]
        input_names=[names[0]], output_names=[names[1]],
        dynamic_axes={names[0]: {0: BATCH_DIM}, names[1]: {0: BATCH_DIM}},
        do_constant_folding=False,  # it would fuse Conv+BatchNorm outside bnfold's accounting
    )
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings, progress prints and logged tracebacks (failures still raise)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_paths(model: onnx.ModelProto, module_names: set[str]) -> dict[str, str]:
    """ONNX node name -> qualified name of the innermost PyTorch module the node came from.

    From the dynamo exporter's name scopes (``['head', 'head.0', 'conv2d_1']``: the last entry is
    the op), else from an initializer the node reads that is a parameter or buffer of a module in
    ``module_names`` (``head.0.weight``). Nodes with neither, or only the root module, are left out.
    """
    initializers = {t.name for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if not node.name:
            continue
        path = _scope_path(node) or next(
            (prefix for name in node.input if name in initializers
             for prefix in [name.rpartition(".")[0]] if prefix in module_names), "")
        if path:
            out[node.name] = path
    return out


def _scope_path(node: onnx.NodeProto) -> str:
    text = next((e.value for e in node.metadata_props if e.key == _SCOPES_KEY), None)
    if text is None:
        return ""
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ""
    return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold without fusing: weights the exporter transposes at run time become initializers,
    batch norms stay (onnxscript's full ``optimize`` would also fuse them)."""
    from onnxscript import ir, optimizer, rewriter
    from onnxscript.rewriter.rules import common as rules

    graph = ir.serde.deserialize_model(model)
    optimizer.fold_constants(graph)
    # A Reshape whose shape is computed from the input's shape gets a constant one (0 or -1 for the
    # batch axis). Only this rewrite: it touches no normalization and renames no layer.
    rewriter.rewrite(graph, [rules.materialize_reshape_shape_rule])
    optimizer.remove_unused_nodes(graph)
    return ir.serde.serialize_model(graph)


def check(model: onnx.ModelProto, *, what: str = "the model") -> None:
    """Run the full ONNX checker (incl. shape inference); raise :class:`BnfoldError` with its message."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnfoldError(f"{what} fails the ONNX checker: {_first_line(exc)}") from exc


def read_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file and run the full checker. Raises :class:`BnfoldError` saying what is wrong."""
    p = existing_file(path, "ONNX file", "an .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf DecodeError and friends
        raise BnfoldError(f"{p} is not a valid ONNX model (cannot parse it: {_first_line(exc)})") from exc
    if not model.graph.node or not model.graph.output:
        raise BnfoldError(f"{p} is not a valid ONNX model (the graph has no nodes or no outputs)")
    check(model, what=str(p))
    return model


def is_onnx_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` should be treated as ONNX: by suffix ``.onnx``."""
    return Path(path).suffix.lower() == ".onnx"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type in the main graph, most frequent first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def graph_input(model: onnx.ModelProto) -> tuple[str, list[int | str]]:
    """Name and shape (ints, or dim_param strings for dynamic axes) of the first real graph input."""
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim
        ]
        return value.name, dims
    raise BnfoldError("the ONNX graph has no input")


def sample_shape(model: onnx.ModelProto, given: Sequence[int] | None = None) -> list[int]:
    """The per-sample input shape (without the batch axis).

    Without ``given`` every axis but the first must be fixed. ``given`` (from ``--input-shape``)
    must have the graph's rank and agree with every fixed axis; it fills the dynamic ones.
    """
    name, dims = graph_input(model)
    rest = dims[1:]
    if given is not None:
        shape = [int(d) for d in given]
        clash = len(shape) != len(rest) or any(isinstance(d, int) and d > 0 and d != g
                                               for d, g in zip(rest, shape, strict=False))
        if clash or any(d <= 0 for d in shape):
            raise BnfoldError(
                f"--input-shape {','.join(map(str, shape))} does not fit ONNX input {name!r} with dimensions "
                f"{dims} (batch axis first)"
            )
        return shape
    if not dims or any(not isinstance(d, int) or d <= 0 for d in rest):
        raise BnfoldError(
            f"cannot tell the sample shape of ONNX input {name!r} with dimensions {dims}: every axis but the "
            "first (batch) must be fixed, or give the shape to verify at with --input-shape"
        )
    return [int(d) for d in rest]


def output_size(model: onnx.ModelProto) -> int | None:
    """The last dimension of the first graph output (the number of logits), if the graph fixes it."""
    dims = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    if not dims or not dims[-1].HasField("dim_value") or dims[-1].dim_value <= 0:
        return None
    return int(dims[-1].dim_value)


def has_dynamic_batch(model: onnx.ModelProto) -> bool:
    _, dims = graph_input(model)
    return bool(dims) and isinstance(dims[0], str)


def random_inputs(shape: Sequence[int], n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` standard-normal float32 samples of ``shape`` (reproducible for a seed)."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset, 0 if it imports none."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def batchnorm_nodes(model: onnx.ModelProto) -> list[str]:
    """Names (or first outputs) of every BatchNormalization node: main graph, subgraphs, functions."""
    found: list[str] = []

    def walk(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                found.append(node.name or (node.output[0] if node.output else node.op_type))
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(sub.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return found


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)
