"""Trace a model into a torch.fx graph whose leaves are the modules the rewriter reasons about.

``torch.fx.symbolic_trace`` keeps ``torch.nn`` modules as leaves and inlines user modules. We
additionally keep as leaves: :class:`bnfold.layers.InputNorm`, an earlier fold's
:class:`~bnfold.fold_torch.guard.RankDispatch`, every batch-norm kind of :mod:`.kinds` (incl.
BN+act and frozen batch norms), and user subclasses of Conv / ConvTranspose / Linear whose forward
is the torch one (so they fold like their base class) or that have no children (a forward of their
own, e.g. timm's ``Conv2dSame``: they fold from the output side if :func:`.probe.output_foldable`
shows it exact). Another module that overrides ``forward``
is traced through: a ``F.batch_norm`` inside it is then matched as a functional batch norm.

Shapes (for the input-rank checks) come from running the graph once (an ``fx.Interpreter``) on
example inputs: given by the caller, built from ``model.input_shape``, or inferred from the first
layer (see :func:`natural_inputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn

from bnfold.errors import BnfoldError
from bnfold.fold_torch.guard import RankDispatch
from bnfold.fold_torch.kinds import recognize
from bnfold.fold_torch.probe import output_foldable
from bnfold.layers import InputNorm

LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)
_SPATIAL_SIZES = (16, 32, 28, 64, 8, 224, 96, 128, 48, 12, 6, 4, 256, 299)  # tried in order for a natural input
SHAPE_KEY = "bnfold_shape"


def torch_base(module: nn.Module) -> type | None:
    """The first class in ``type(module)``'s MRO defined inside ``torch.nn`` (None for pure user classes)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return cls
    return None


def has_torch_forward(module: nn.Module, *methods: str) -> bool:
    """True when ``forward`` (and ``methods``) of ``module`` are those of its ``torch.nn`` base class."""
    base = torch_base(module)
    if base is None:
        return False
    return all(getattr(type(module), m, None) is getattr(base, m, None) for m in ("forward", *methods))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, InputNorm) and type(m).forward is InputNorm.forward:
            return True
        if isinstance(m, RankDispatch):  # an earlier fold's rank dispatch: data-dependent branch, and done
            return True
        if isinstance(m, LAYER_TYPES) and (has_torch_forward(m) or not m._modules):
            return True  # a subclass with a forward of its own folds if the output probe allows (as_layer)
        if recognize(m) is not None:  # every batch-norm kind is a leaf, whatever its forward does
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, given: int = 0) -> fx.GraphModule:
    """Symbolically trace ``model`` (already an eval-mode copy). Raises whatever tracing raises.

    Arguments that default to ``None`` (``mask=None``) and are not among the ``given`` first
    positional example inputs are traced as ``None``: traced as a tensor, ``if mask is not None:``
    would always be taken and the folded model would fail when called without them. torch.fx then
    checks at run time that they are still ``None``.
    """
    for module in model.modules():  # probe now: tracing patches nn.Module.__call__ (see .probe)
        recognize(module)
        if isinstance(module, LAYER_TYPES) and not has_torch_forward(module):
            output_foldable(module)
    tracer = _Tracer()
    nones = _none_defaults(model, given)
    graph = tracer.trace(model, concrete_args=nones or None)
    for node in graph.nodes:  # fx renames specialized arguments (mask -> mask_1); keep the caller's keyword
        target = str(node.target)
        if node.op == "placeholder" and target.endswith("_1") and target[:-2] in nones:
            node.target = target[:-2]
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _none_defaults(model: nn.Module, given: int) -> dict[str, None]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: None for i, p in enumerate(params) if i >= given and p.default is None and p.kind in kinds}


def as_input_tuple(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Normalize ``example_inputs`` (a tensor or a tuple/list of tensors) to a tuple."""
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(
            f"example_inputs must be a torch.Tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    return tuple(items)


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(result.shape)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Record the output shape of every tensor-valued node by running ``gm`` once on ``inputs``."""
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except Exception:
        clear_shapes(gm)
        raise


def clear_shapes(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(SHAPE_KEY, None)


def natural_inputs(model: nn.Module, gm: fx.GraphModule) -> tuple[Iterator[tuple[torch.Tensor, ...]], str] | None:
    """Candidate example inputs when the caller gave none, and a sentence saying where they came from.

    ``model.input_shape`` (a shape without the batch dimension) wins; otherwise the first layer
    reached from the single graph input through per-channel ops must be unambiguous: a Conv{d}d or
    ConvTranspose{d}d gives ``(2, C_in, S, ...)`` for a few spatial sizes ``S``, a Linear ``(2, in_features)``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if first is None else first.dtype
    device = torch.device("cpu") if first is None else first.device
    shape = getattr(model, "input_shape", None)
    valid = isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s >= 0 for s in shape)
    if valid and len(placeholders) == 1:
        inputs: tuple[torch.Tensor, ...] = (torch.randn((2, *shape), dtype=dtype, device=device),)  # type: ignore[misc]
        return iter([inputs]), f"model.input_shape={tuple(shape)}"  # type: ignore[arg-type]
    if len(placeholders) != 1:
        return None
    firsts: set[tuple[str, int, int]] = set()
    where = ""
    frontier, seen = [placeholders[0]], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            mod = gm.get_submodule(user.target) if user.op == "call_module" else None  # type: ignore[arg-type]
            if isinstance(mod, LAYER_TYPES) and user.args and user.args[0] is node:
                kind = type(mod).__name__
                dims = 0 if isinstance(mod, nn.Linear) else len(mod.kernel_size)  # type: ignore[arg-type]
                cin = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                firsts.add((kind, dims, int(cin)))  # type: ignore[arg-type]
                where = f"{user.target} ({kind}, {'in_features' if dims == 0 else 'in_channels'}={cin})"
            elif isinstance(mod, (InputNorm, nn.Identity, nn.Dropout)) or (mod is not None and recognize(mod)):
                frontier.append(user)
            else:
                return None  # some other op sees the raw input first: no natural shape
    if len(firsts) != 1:
        return None
    kind, dims, cin = next(iter(firsts))
    if dims == 0:
        inputs = (torch.randn(2, cin, dtype=dtype, device=device),)
        return iter([inputs]), f"the first layer {where}: input shape (2, {cin})"
    # A generator: the tensors are built one at a time (a 299**3 volume is big).
    cands = ((torch.randn((2, cin, *(s,) * dims), dtype=dtype, device=device),) for s in _SPATIAL_SIZES)
    return cands, f"the first layer {where}: input shape (2, {cin}, S{', S' * (dims - 1)})"


ShapeSource = Literal["given", "guessed", "none"]


def shapes_from(model: nn.Module, gm: fx.GraphModule, example_inputs: object | None) -> tuple[ShapeSource, str | None]:
    """Record shapes on ``gm``'s nodes. Returns where they came from and a note if they were inferred.

    ``"given"``: from ``example_inputs`` or ``model.input_shape``; ``"guessed"``: from the first
    layer (the input rank is an assumption); ``"none"``: no shapes recorded.

    Raises :class:`BnfoldError` when given ``example_inputs`` do not run through the model.
    """
    if example_inputs is not None:
        inputs = as_input_tuple(example_inputs)
        try:
            propagate_shapes(gm, inputs)
        except Exception as e:  # the user's inputs do not fit the model
            shapes = [tuple(t.shape) for t in inputs]
            raise BnfoldError(f"example_inputs with shapes {shapes} do not run through the model: {e}") from e
        return "given", None
    found = natural_inputs(model, gm)
    if found is None:
        return "none", None
    candidates, source = found
    for inputs in candidates:
        try:
            propagate_shapes(gm, inputs)
        except Exception:
            continue
        shape = tuple(inputs[0].shape)
        if source.startswith("model.input_shape"):
            return "given", f"no example_inputs given: shapes taken from {source}"
        return "guessed", (
            f"no example_inputs given: input rank taken from {source} (ran shape {shape}); "
            "pass example_inputs if the model is used with inputs of another rank"
        )
    return "none", None
