"""Turn functional convolutions and linear layers on constant weights into modules, so they fold like modules.

``F.conv2d(x, self.weight, self.bias, ...)`` in a forward, and ``aten.conv2d`` / ``aten.linear`` /
``aten.convolution`` nodes in a ``torch.export`` graph, compute exactly what ``nn.Conv2d`` /
``nn.Linear`` with the same tensors and hyper-parameters compute. When the weight and bias are
registered tensors (``get_attr`` nodes) and every other argument is a constant, the call is
replaced by a ``call_module`` of such a module holding *the same* tensor objects: nothing is copied
and the graph computes the same function. The rewriter then folds into it (a fold assigns new
tensors, so other readers of the original attributes keep the original values).

The module takes the name of the tensors' owner when that owner holds nothing else (a
``torch.export`` graph keeps the original module path, ``layer1.0.conv1``), so parameter names
survive; otherwise a fresh ``<node>_layer`` name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_aten = torch.ops.aten
# target -> (kind, spatial dims, argument names in order after (input, weight, bias))
_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_FUNCTIONS: dict[Any, tuple[str, int, tuple[str, ...]]] = {
    F.linear: ("linear", 0, ()),
    _aten.linear.default: ("linear", 0, ()),
    F.conv1d: ("conv", 1, _CONV_ARGS),
    F.conv2d: ("conv", 2, _CONV_ARGS),
    F.conv3d: ("conv", 3, _CONV_ARGS),
    _aten.conv1d.default: ("conv", 1, _CONV_ARGS),
    _aten.conv2d.default: ("conv", 2, _CONV_ARGS),
    _aten.conv3d.default: ("conv", 3, _CONV_ARGS),
    _aten.conv1d.padding: ("conv", 1, _CONV_ARGS),
    _aten.conv2d.padding: ("conv", 2, _CONV_ARGS),
    _aten.conv3d.padding: ("conv", 3, _CONV_ARGS),
    _aten.convolution.default: ("convolution", 0,
                                ("stride", "padding", "dilation", "transposed", "output_padding", "groups")),
}
_DEFAULTS: dict[str, Any] = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False,
                             "output_padding": 0}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def lift_functional_layers(gm: fx.GraphModule) -> list[str]:
    """Replace every liftable functional layer call in ``gm`` by a module call; return the module names."""
    lifted = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONS:
            continue
        built = _module_for(gm, node)
        if built is None:
            continue
        module, attrs = built
        name = _name_for(gm, node, attrs)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                gm.graph.erase_node(attr)
        lifted.append(name)
    return lifted


def not_liftable(node: fx.Node) -> str | None:
    """For a functional layer call left in the graph: why it was not turned into a module (else None)."""
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    args = _arguments(node, _FUNCTIONS[node.target][2]) or {}
    what = f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    for key in ("weight", "bias"):
        value = args.get(key)
        if isinstance(value, fx.Node) and value.op != "get_attr":
            return (f"the {key} of {what} is computed at run time (by {value.name}), not a registered parameter "
                    "or buffer, so it is not a constant to fold into")
    return f"{what} has arguments bnfold cannot read as constants"


def _arguments(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any] | None:
    all_names = ("input", "weight", "bias", *names)
    if len(node.args) > len(all_names) or any(k not in all_names for k in node.kwargs):
        return None
    args = dict(zip(all_names, node.args, strict=False))
    args.update(node.kwargs)
    return args


def _module_for(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, list[fx.Node]] | None:
    kind, dims, names = _FUNCTIONS[node.target]
    args = _arguments(node, names)
    if args is None or not isinstance(args.get("input"), fx.Node):
        return None
    weight_node, bias_node = args.get("weight"), args.get("bias")
    attrs = [a for a in (weight_node, bias_node) if a is not None]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in attrs) or weight_node is None:
        return None
    rest = [args.get(n, _DEFAULTS[n]) for n in names]
    if _has_node(rest):  # a hyper-parameter computed at run time
        return None
    weight = _fetch(gm, str(weight_node.target))  # type: ignore[union-attr]
    bias = None if bias_node is None else _fetch(gm, str(bias_node.target))  # type: ignore[union-attr]
    if not isinstance(weight, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        return None
    if kind == "convolution":
        params = {n: args.get(n, _DEFAULTS[n]) for n in names}
        if params["transposed"] is not False or weight.dim() < 3:
            return None
        if any(int(p) != 0 for p in _tuple(params.pop("output_padding"))):
            return None
        params.pop("transposed")
        kind, dims = "conv", weight.dim() - 2
    else:
        params = {n: args.get(n, _DEFAULTS[n]) for n in names}
    try:
        module = _build(kind, dims, weight, bias, params)
    except (TypeError, ValueError, RuntimeError, KeyError):
        return None
    return module, attrs  # type: ignore[return-value]


def _has_node(values: list[Any]) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)  # type: ignore[arg-type]
    return bool(found)


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _build(kind: str, dims: int, weight: torch.Tensor, bias: torch.Tensor | None,
           params: dict[str, Any]) -> nn.Module:
    if kind == "linear":
        if weight.dim() != 2:
            raise ValueError("linear weight must be 2-D")
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        if weight.dim() != dims + 2:
            raise ValueError("conv weight rank does not match")
        groups = int(params["groups"])
        padding = params["padding"]
        module = _CONV[dims](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),  # type: ignore[arg-type]
                             stride=params["stride"],
                             padding=padding if isinstance(padding, (str, int)) else tuple(padding),  # type: ignore[arg-type]
                             dilation=params["dilation"], groups=groups, bias=bias is not None, device="meta")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        del module._parameters[name]
        if isinstance(tensor, nn.Parameter):
            module.register_parameter(name, tensor)
        else:
            module.register_buffer(name, tensor)
    return module


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None


def _name_for(gm: fx.GraphModule, node: fx.Node, attrs: list[fx.Node]) -> str:
    """The owner's path if the owner holds just these tensors and nothing else reads them, else a fresh name."""
    owners = {str(a.target).rpartition(".")[0] for a in attrs}
    if len(owners) == 1:
        owner = next(iter(owners))
        leaves = {str(a.target).rpartition(".")[2] for a in attrs}
        try:
            holder = gm.get_submodule(owner) if owner else None
        except AttributeError:
            holder = None
        if (holder is not None and type(holder) is nn.Module and not holder._modules
                and set(holder._parameters) | set(holder._buffers) == leaves
                and all(len(a.users) == 1 for a in attrs)
                and not any(n.op == "get_attr" and n not in attrs and str(n.target).startswith(owner + ".")
                            for n in gm.graph.nodes)):
            return owner
    base, k = f"{node.name}_layer", 0
    name = base
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name
