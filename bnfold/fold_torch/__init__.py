"""Fold batch norms in a PyTorch model into neighbouring Conv/ConvTranspose/Linear layers, exactly.

``fold_torch(model)`` works on a deep copy: it switches it to eval mode, traces it with torch.fx
(:mod:`.trace`), finds every batch norm / InputNorm application (:mod:`.norms`), and for each one
matches the layer before or after it, checks that the fold is exact, and rewrites
(:mod:`.rewrite`). Folds repeat until nothing changes, so chains (``bn -> bn -> linear``) fold too.
Every batch norm ends up in ``result.folded`` or, with a reason, in ``result.skipped``.

Models torch.fx cannot trace are handled by :mod:`.fallback` (fold inside traceable submodules).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

from bnfold.errors import BnfoldError
from bnfold.fold_torch.branches import merge_branches
from bnfold.fold_torch.kinds import recognize
from bnfold.fold_torch.lift import lift_functional_layers
from bnfold.fold_torch.norms import Norm, find_norms
from bnfold.fold_torch.ranks import annotate_ranks
from bnfold.fold_torch.rewrite import try_fold
from bnfold.fold_torch.trace import as_input_tuple, shapes_from, trace
from bnfold.layers import InputNorm
from bnfold.result import Folded, FoldResult, Skipped

__all__ = ["fold_torch"]

TRAIN_MODE_NOTE = "model was in train mode: folded with running statistics and returned in eval mode"


def fold_torch(
    model: nn.Module, *, example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
) -> FoldResult[nn.Module]:
    """Fold every batch norm (and :class:`~bnfold.layers.InputNorm`) of ``model`` that folds exactly.

    ``model`` is not modified. ``example_inputs`` (a tensor or a tuple of positional inputs) are
    used only for shapes: some folds are correct only at certain input ranks (a ``BatchNorm1d``
    after a ``Linear`` is, for 2-D input). Without them the shapes come from ``model.input_shape``
    or the first layer (noted in ``result.notes``), else the ranks from the graph's structure
    (``Flatten``, ``view``, ``BatchNorm2d``, ...); a fold exact at one rank only that none of these
    fix is made with a rank dispatch: folded at that rank, the original ops at others (see :mod:`.guard`).
    The result's model is in eval mode (a ``torch.fx.GraphModule`` when anything was folded).
    A ``torch.compile`` / ``DataParallel`` wrapper is unwrapped: the result is the folded inner module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_torch expects a torch.nn.Module, got {type(model).__name__}")
    wrapped = _wrapped(model)
    if wrapped is not None:
        return _fold_wrapped(model, *wrapped, example_inputs)
    if isinstance(model, torch.jit.ScriptModule):
        raise BnfoldError(f"{model.original_name} is a TorchScript module (torch.jit.script/trace), which bnfold "
                          "cannot rewrite; pass the eager nn.Module (fold first, then script), or export to ONNX "
                          "and fold that")
    lazy = [n or type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]  # type: ignore[misc]
    if lazy:
        raise BnfoldError(f"model has uninitialized lazy modules ({', '.join(lazy)}); run one forward pass first")
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise BnfoldError(f"cannot copy {type(model).__name__} to fold it (copy.deepcopy failed: {e})") from e
    notes = [TRAIN_MODE_NOTE] if any(m.training for m in work.modules()) else []
    work.eval()
    given = len(as_input_tuple(example_inputs)) if example_inputs is not None else 0
    try:
        gm = trace(work, given)
    except Exception as e:
        from bnfold.fold_torch.fallback import fold_untraceable

        return fold_untraceable(work, e, example_inputs, notes)
    try:
        result = fold_graph(work, gm, example_inputs)
    except (BnfoldError, TypeError, ValueError):
        raise
    except Exception as e:  # a bug or an unforeseen model: say so in one line rather than crash
        raise BnfoldError(f"bnfold could not fold {type(model).__name__}: {type(e).__name__}: {e}") from e
    result.notes[:0] = notes
    return result


def _wrapped(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(attribute, inner module)`` when ``model`` only wraps another module (torch.compile, DataParallel)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # a compiled module means dynamo is loaded: importing
    if frames is not None and isinstance(model, frames.OptimizedModule):  # it just to check costs ~2 s
        return "_orig_mod", model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", model.module
    return None


def _fold_wrapped(model: nn.Module, attr: str, inner: nn.Module, example_inputs: Any) -> FoldResult[nn.Module]:
    """Fold the module inside a wrapper; names in the result are those of ``model`` (``<attr>.<name>``)."""
    result = fold_torch(inner, example_inputs=example_inputs)
    result.folded = [Folded(bn=f"{attr}.{f.bn}", into=f"{attr}.{f.into}", side=f.side) for f in result.folded]
    result.skipped = [Skipped(bn=f"{attr}.{s.bn}", reason=s.reason) for s in result.skipped]
    result.notes.insert(0, f"{type(model).__name__} was unwrapped: the result is the folded {attr} (an eager "
                           f"module); wrap it again ({type(model).__name__}) if you need to")
    return result


def norm_paths(module: nn.Module) -> list[str]:
    """Qualified names of the batch norm and InputNorm modules in ``module``, including those compiled
    by ``torch.jit.script`` (reported as kept: TorchScript cannot be rewritten)."""
    return [n for n, m in module.named_modules()
            if isinstance(m, InputNorm) or recognize(m) is not None or _scripted_norm(m)]


def _scripted_norm(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _NORM_NAMES


_NORM_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InputNorm"}


def unreached_reason(root: nn.Module, path: str) -> str:
    """Why the norm at ``path`` was not found in the traced graph."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        sub = root.get_submodule(".".join(parts[:i]))
        if isinstance(sub, torch.jit.ScriptModule):
            return (f"{path} is inside {'.'.join(parts[:i])}, a torch.jit.script-ed module, which bnfold cannot "
                    "rewrite; fold the eager module first, then script it")
    return (f"{path} is not called by the traced forward() (unused, or inside a module bnfold does not look "
            "into), so there is nothing to fold")


def fold_graph(work: nn.Module, gm: fx.GraphModule, example_inputs: Any) -> FoldResult[nn.Module]:
    """Fold inside ``gm``, the trace of ``work`` (an eval-mode copy). Returns ``work`` if nothing folded."""
    notes: list[str] = []
    paths = norm_paths(work)
    lift_functional_layers(gm)  # F.conv2d / aten.linear on registered weights fold like modules
    # Before shapes: these ranks come from the graph's structure alone. Best effort: a node left
    # unannotated has an unknown rank, which can only add rank dispatches.
    with contextlib.suppress(Exception):
        annotate_ranks(gm)
    source, shape_note = shapes_from(work, gm, example_inputs)
    norms = find_norms(gm, set(paths))
    by_name: dict[str, list[Norm]] = {}
    for norm in norms:
        by_name.setdefault(norm.name, []).append(norm)
    # Each application (site) of a norm folds on its own; a chain (bn -> bn -> linear) needs several passes.
    site_outcome: dict[fx.Node, Folded | str] = {n.node: n.reason for n in norms if n.reason is not None}
    pending = [n for n in norms if n.reason is None]
    progress = True
    while progress and pending:
        progress = False
        for norm in list(pending):
            result = try_fold(gm, norm, notes, trusted_shapes=source == "given")
            site_outcome[norm.node] = result
            if isinstance(result, Folded):
                pending.remove(norm)
                progress = True
    outcome = {name: _merge(name, [(s.node.name, site_outcome[s.node]) for s in sites])
               for name, sites in by_name.items()}
    # Parallel branches over one input (RepVGG/MobileOne), their BNs now folded, sum into one conv; an
    # identity branch's BN goes into it too.
    singles = {sites[0].node: sites[0] for sites in by_name.values()
               if len(sites) == 1 and isinstance(outcome[sites[0].name], str) and sites[0].affine is not None}
    merges = merge_branches(gm, singles)
    for merge in merges:
        for name in merge.norms:  # an identity branch's BN: applied to the merged conv's input
            outcome[name] = Folded(bn=name, into=merge.into, side="input")
        notes.append(f"branches {' + '.join(merge.branches)} summed over one input were merged into one "
                     f"convolution, {merge.into} (structural re-parameterization)")
    folded = [o for o in outcome.values() if isinstance(o, Folded)]
    skipped = [Skipped(bn=n, reason=o) for n, o in outcome.items() if isinstance(o, str)]
    skipped += [Skipped(bn=p, reason=unreached_reason(work, p)) for p in paths if p not in outcome]
    if shape_note:
        notes.insert(0, shape_note)
    if not merges and not any(isinstance(o, Folded) for o in site_outcome.values()):  # graph not rewritten
        return FoldResult(model=work, folded=[], skipped=skipped, notes=notes)
    gm.graph.lint()
    gm.recompile()
    _keep_plain_attributes(work, gm)
    gm.eval()
    return FoldResult(model=gm, folded=folded, skipped=skipped, notes=notes)


def _merge(name: str, sites: list[tuple[str, Folded | str]]) -> Folded | str:
    """One report entry for a norm applied at several places: folded only if folded at every one."""
    if len(sites) == 1:
        return sites[0][1]
    done = [o for _, o in sites if isinstance(o, Folded)]
    if len(done) == len(sites):
        return Folded(bn=name, into=", ".join(dict.fromkeys(f.into for f in done)), side=done[0].side)
    kept = "; ".join(f"at {node}: {o}" for node, o in sites if isinstance(o, str))
    folded_at = f"folded at {len(done)} of {len(sites)} places, " if done else ""
    return f"{name} is applied at {len(sites)} places; {folded_at}kept {kept}"


def _keep_plain_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Carry over plain data attributes (e.g. ``input_shape``, ``class_names``) the GraphModule drops."""
    for key, value in vars(src).items():
        if key.startswith("_") or key == "training" or hasattr(dst, key):
            continue
        if isinstance(value, (int, float, str, bool, tuple, list, dict)) or value is None:
            setattr(dst, key, copy.deepcopy(value))
