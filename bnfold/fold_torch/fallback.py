"""Fold inside the traceable parts of a model whose own forward torch.fx cannot trace.

When ``symbolic_trace`` fails on the root (data-dependent control flow, unsupported Python), each
child module is traced on its own; the ones that trace are folded independently and put back in
place of the original child, the others are searched recursively. Folding a child in isolation is
only safe if nothing outside it reaches into it, so a child is refused when

* it, or any module inside it, is reachable by more than one path (shared with another part), or
* the source of an untraceable ancestor's ``forward`` mentions ``<child>.<attr>`` or ``getattr``
  (it might call or read the child's layers directly, bypassing the child's forward), or an
  ancestor's ``forward`` is replaced on the instance (it may hold references to the old child).

A batch norm directly inside an untraceable module is kept with the tracing error as the reason.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.fold_torch.kinds import recognize
from bnfold.fold_torch.trace import as_input_tuple, trace
from bnfold.layers import InputNorm
from bnfold.result import Folded, FoldResult, Skipped


def fold_untraceable(work: nn.Module, error: Exception, example_inputs: Any, notes: list[str]) -> FoldResult[nn.Module]:
    """Fold the traceable children of ``work`` (an eval-mode copy) in place; see the module docstring."""
    from bnfold.fold_torch import fold_graph, norm_paths, unreached_reason

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    counts = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    calls = _child_inputs(work, example_inputs)
    folded: list[Folded] = []
    skipped: list[Skipped] = []
    done: list[str] = []
    visited: set[int] = set()

    def visit(module: nn.Module, prefix: str, ancestors: list[tuple[nn.Module, str]]) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            inner = norm_paths(child)
            if not inner or id(child) in visited:  # a module under two names is reported once
                continue
            visited.add(id(child))
            why = (f"it is used by {type(module).__name__} ({prefix.rstrip('.') or 'the root'}), inside a forward() "
                   f"torch.fx cannot trace ({first_line}); make that forward traceable to fold it")
            if isinstance(child, InputNorm) or recognize(child) is not None:
                skipped.append(Skipped(bn=path, reason=why))
                continue
            if isinstance(child, torch.jit.ScriptModule):
                skipped.extend(Skipped(bn=f"{path}.{p}" if p else path, reason=unreached_reason(work, f"{path}.{p}"
                                                                                               if p else path))
                               for p in inner)
                continue
            problem = _unsafe(child, name, [*ancestors, (module, name)], counts)
            if problem is not None:
                skipped.extend(Skipped(bn=f"{path}.{p}" if p else path, reason=f"{problem}; {why}") for p in inner)
                continue
            recorded = calls.get(id(child))
            try:
                gm = trace(child, len(recorded) if recorded else 0)
            except Exception:
                visit(child, f"{path}.", [*ancestors, (module, name)])
                continue
            try:
                sub = fold_graph(child, gm, recorded)
            except Exception:  # the recorded inputs do not fit the traced child: fold it without shapes
                try:
                    sub = fold_graph(child, trace(child, len(recorded) if recorded else 0), None)
                except Exception as e:
                    reason = f"folding inside {path} on its own failed ({type(e).__name__}: {e}); {why}"
                    skipped.extend(Skipped(bn=f"{path}.{p}", reason=reason) for p in inner)
                    continue
            folded.extend(Folded(bn=f"{path}.{f.bn}", into=f"{path}.{f.into}", side=f.side) for f in sub.folded)
            notes.extend(f"{path}: {n}" for n in sub.notes)
            skipped.extend(Skipped(bn=f"{path}.{s.bn}", reason=s.reason) for s in sub.skipped)
            if sub.folded:
                setattr(module, name, sub.model)
                done.append(path)

    paths = norm_paths(work)
    visit(work, "", [])
    reported = {f.bn for f in folded} | {s.bn for s in skipped}
    skipped.extend(  # e.g. the model is itself a batch norm
        Skipped(bn=p, reason=f"{p} is used inside a forward() torch.fx cannot trace ({first_line}), and bnfold "
                             "found no traceable part around it to fold" if p else
                f"the model is itself a {type(work).__name__}: there is no layer next to it to fold it into")
        for p in paths if p not in reported
    )
    notes.append(
        f"the forward() of {type(work).__name__} cannot be traced by torch.fx ({first_line}): folded inside the "
        f"traceable submodules independently ({', '.join(done) or 'none folded'})"
    )
    work.eval()
    return FoldResult(model=work, folded=folded, skipped=skipped, notes=notes)


def _unsafe(child: nn.Module, name: str, ancestors: list[tuple[nn.Module, str]], counts: Counter[int]) -> str | None:
    """Why folding ``child`` on its own might change what code outside it computes (None: safe)."""
    shared = [n or "(itself)" for n, m in child.named_modules(remove_duplicate=False) if counts[id(m)] > 1]
    if shared:
        return f"{name}: {', '.join(shared)} is reachable by more than one path, so it may be used outside {name}"
    for anc, below in ancestors:
        if "forward" in vars(anc):  # e.g. a compiled or monkeypatched forward bound to other module objects
            return (f"{type(anc).__name__} has its forward replaced on the instance, so bnfold cannot tell whether "
                    f"it calls {below} through the attribute it would replace")
        # self.<below>.x, self.<below>[i], getattr(...): the ancestor may use the child's insides directly.
        pattern = re.compile(rf"\.{re.escape(below)}\s*[.\[]|getattr\s*\(")
        try:
            source = inspect.getsource(type(anc).forward)
        except (OSError, TypeError):
            return f"the source of {type(anc).__name__}.forward is not available to check how it uses {name}"
        if pattern.search(source):
            return f"{type(anc).__name__}.forward may reach into {below} directly ({below}.<attr> or getattr)"
    return None


def _child_inputs(work: nn.Module, example_inputs: Any) -> dict[int, tuple[torch.Tensor, ...]]:
    """Inputs each submodule received when ``work`` ran on ``example_inputs`` (first call only)."""
    if example_inputs is None:
        return {}
    inputs = as_input_tuple(example_inputs)
    seen: dict[int, tuple[torch.Tensor, ...]] = {}
    ranks: dict[int, set[tuple[int, ...]]] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        if all(isinstance(a, torch.Tensor) for a in args):
            seen.setdefault(id(mod), args)
            ranks.setdefault(id(mod), set()).add(tuple(a.dim() for a in args))

    handles = [m.register_forward_pre_hook(hook) for m in work.modules()]
    try:
        with torch.no_grad():
            work(*inputs)
    except Exception as e:
        shapes = [tuple(t.shape) for t in inputs]
        raise BnfoldError(f"example_inputs with shapes {shapes} do not run through the model: {e}") from e
    finally:
        for h in handles:
            h.remove()
    # A module called with inputs of different ranks gets no shapes: rank-dependent folds are then refused.
    return {k: v for k, v in seen.items() if len(ranks[k]) == 1}
