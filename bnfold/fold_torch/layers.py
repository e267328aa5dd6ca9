"""The layers a batch norm folds into, described by the few numbers the arithmetic needs.

Conv, ConvTranspose and Linear differ only in where their channels live:

============== ======================== ============ =============== ============
layer          weight layout            output side  input side      channel axis
============== ======================== ============ =============== ============
Conv{d}d       ``(out, in/g, k...)``    axis 0       axis 1, groups  1 (batched)
ConvTranspose  ``(in, out/g, k...)``    axis 1, g    axis 0          1 (batched)
Linear         ``(out, in)``            axis 0       axis 1          last
============== ======================== ============ =============== ============

A batch norm always normalizes axis 1 of its input, so the fold is only correct when the layer's
channel axis is axis 1 of the tensor: a batched (``d + 2``-D) tensor for Conv, a 2-D tensor for
Linear. :func:`rank_problem` checks that from the recorded shapes or, without shapes, from the
input ranks the batch norm itself accepts (``BatchNorm2d`` only accepts 4-D input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from bnfold.arith import Affine, fold_input_side, fold_output_side, input_side_exactness
from bnfold.fold_torch.guard import RankDispatch
from bnfold.fold_torch.lift import not_liftable
from bnfold.fold_torch.probe import output_foldable
from bnfold.fold_torch.trace import LAYER_TYPES, has_torch_forward

Side = Literal["output", "input"]
_ANY_RANK = frozenset(range(1, 10))


@dataclass(frozen=True)
class Layer:
    """A foldable layer module: ``kind`` plus the channel bookkeeping of :mod:`bnfold.arith`."""

    module: nn.Module
    kind: Literal["conv", "conv_transpose", "linear"]
    dims: int  # spatial dims; 0 for Linear
    in_channels: int
    out_channels: int
    groups: int
    output_only: bool = False  # a subclass with its own forward, probed to fold exactly from the output side

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def good_rank(self) -> int:
        """The tensor rank at which the layer's channels sit on axis 1."""
        return 2 if self.kind == "linear" else self.dims + 2

    @property
    def possible_ranks(self) -> frozenset[int]:
        return _ANY_RANK if self.kind == "linear" else frozenset({self.dims + 1, self.dims + 2})


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name for what ``node`` computes."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}() ({node.name})"
    if node.op == "call_method":
        return f".{node.target}() ({node.name})"
    if node.op == "placeholder":
        return f"the model input {node.name}"
    if node.op == "output":
        return "the model output"
    return f"the constant {node.target}"


def as_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | str:
    """The :class:`Layer` that ``node`` calls, or why it is not a layer bnfold can fold into."""
    if node.op != "call_module":
        return not_liftable(node) or f"{describe(gm, node)} is not a Conv/ConvTranspose/Linear module"
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, RankDispatch):  # an earlier fold into this layer: fold into its folded path too
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{node.target} (RankDispatch) has forward hooks; remove them first"
        mod = mod.folded
    name = f"{node.target} ({type(mod).__name__})"
    if not isinstance(mod, LAYER_TYPES):
        return f"{name} is not a Conv/ConvTranspose/Linear module"
    output_only = not has_torch_forward(mod, "_conv_forward")
    if output_only and not output_foldable(mod):
        return (f"{name} overrides the torch forward, and a probe shows that scaling its weights per output "
                "channel does not scale its output the same way, so folding into it would not be exact")
    if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
        return f"{name} is not initialized yet; run one forward pass before folding"
    if parametrize.is_parametrized(mod):
        return f"{name} has parametrized weights (torch.nn.utils.parametrize); remove the parametrizations first"
    if mod._forward_hooks or mod._forward_pre_hooks:
        return (f"{name} has forward hooks (e.g. weight_norm or spectral_norm) that may recompute its weights; "
                "remove them first")
    weight, bias = mod.weight, mod.bias
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return (f"{name} has a weight of type {type(weight).__name__} / {getattr(weight, 'dtype', None)}, "
                "not a floating tensor")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        return f"{name} has a bias of type {type(bias).__name__}, not a floating tensor"
    if isinstance(mod, nn.Linear):
        return Layer(mod, "linear", 0, int(mod.in_features), int(mod.out_features), 1, output_only)
    kind: Literal["conv", "conv_transpose"] = "conv_transpose" if mod.transposed else "conv"  # type: ignore[assignment]
    return Layer(mod, kind, len(mod.kernel_size), int(mod.in_channels), int(mod.out_channels),  # type: ignore[arg-type]
                 int(mod.groups), output_only)  # type: ignore[arg-type]


def rank_problem(layer: Layer, target: str, norm_kind: str, norm_name: str, norm_ranks: frozenset[int] | None,
                 known: frozenset[int] | None, side: Side) -> str | None:
    """``None`` when the norm's axis 1 is the layer's channel axis at every rank the graph allows, else why not.

    ``known`` are the ranks the tensor between them may have (recorded shapes or graph structure;
    None: unknown).
    """
    where = "output" if side == "output" else "input"
    possible = layer.possible_ranks if known is None else layer.possible_ranks & known
    accepted = norm_ranks if norm_ranks is not None else frozenset(range(2, 10))
    both = possible & accepted
    if not both:
        got = "/".join(f"{r}-D" for r in sorted(known if known else possible))
        return (f"{norm_name} ({norm_kind}) takes {'/'.join(f'{r}-D' for r in sorted(accepted))} input but the "
                f"{where} of {target} ({layer.type_name}) is {got}")
    if both == {layer.good_rank}:
        return None
    if known is not None and len(known) == 1:
        actual = next(iter(known))
        if layer.kind == "linear":
            return (f"{target} (Linear) acts on the last axis of its {actual}-D {where} but {norm_name} normalizes "
                    f"axis 1: they are the same axis only for 2-D tensors")
        return (f"{target} ({layer.type_name}) sees an unbatched {actual}-D tensor here, so its channels are on "
                f"axis 0 but {norm_name} normalizes axis 1")
    if layer.good_rank in both:
        return None  # exact at the good rank only: the rewrite adds a rank dispatch (rank_pinned)
    return (f"whether {norm_name} normalizes the channel axis of {target} ({layer.type_name}) depends on the "
            f"input rank ({' or '.join(f'{r}-D' for r in sorted(both))}), which is unknown: pass "
            "example_inputs=... to bnfold.fold")


def rank_pinned(layer: Layer, norm_ranks: frozenset[int] | None, known: frozenset[int] | None) -> bool:
    """True when ``known`` (ranks the graph's structure allows; None: any) leaves only the rank at which
    the fold is exact. Otherwise the fold dispatches on the layer's input rank at run time (guard)."""
    possible = layer.possible_ranks if known is None else layer.possible_ranks & known
    accepted = norm_ranks if norm_ranks is not None else frozenset(range(2, 10))
    return possible & accepted == {layer.good_rank}


def channel_problem(layer: Layer, target: str, norm_name: str, channels: int, side: Side) -> str | None:
    have = layer.out_channels if side == "output" else layer.in_channels
    attr = {"linear": "features", "conv": "channels", "conv_transpose": "channels"}[layer.kind]
    if have != channels:
        io = "out" if side == "output" else "in"
        return f"{norm_name} has num_features={channels} but {target}.{io}_{attr}={have}"
    return None


def exactness_problem(layer: Layer, affine: Affine) -> str | None:
    """For the input side: ``None`` when moving the shift into the layer's bias is exact (see arith)."""
    if layer.kind == "linear":
        return None
    mod = layer.module
    padding = mod.padding
    if isinstance(padding, str):  # 'valid' or 'same'
        kernel, dilation = mod.kernel_size, mod.dilation  # type: ignore[union-attr]
        pads = tuple(0 if padding == "valid" else d * (k - 1) for k, d in zip(kernel, dilation, strict=True))  # type: ignore[arg-type]
    else:
        pads = tuple(int(p) for p in padding)  # type: ignore[union-attr]
    return input_side_exactness(affine, pads=pads, padding_mode=str(mod.padding_mode),
                                transposed=layer.kind == "conv_transpose")


def folded_params(layer: Layer, affine: Affine, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """The layer's new weight and bias in float64 (``bnfold.arith`` does the math)."""
    mod = layer.module
    w = mod.weight.detach().double().cpu().numpy()  # type: ignore[union-attr, operator]
    b = None if mod.bias is None else mod.bias.detach().double().cpu().numpy()  # type: ignore[union-attr, operator]
    transposed = layer.kind == "conv_transpose"
    if side == "output":
        return fold_output_side(w, b, affine, axis=1 if transposed else 0, groups=layer.groups if transposed else 1)
    if transposed:
        return fold_input_side(w, b, affine, axis=0, out_axis=1, groups=layer.groups, out_channels=layer.out_channels)
    return fold_input_side(w, b, affine, axis=1, out_axis=0, groups=layer.groups)


def assign(module: nn.Module, name: str, value: np.ndarray, like: torch.Tensor) -> None:
    """Set ``module.<name>`` to a fresh tensor (never in place: tied copies elsewhere keep their values).

    The new tensor has ``like``'s dtype and device and the same kind (Parameter, buffer or attribute).
    """
    tensor = torch.from_numpy(value).to(dtype=like.dtype, device=like.device)
    if name in module._parameters:
        old = module._parameters[name]
        requires_grad = old.requires_grad if old is not None else like.requires_grad
        module._parameters[name] = nn.Parameter(tensor, requires_grad=requires_grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        setattr(module, name, tensor)
