"""One account of every batch norm across bnfold's two folds, checked against the graph written.

A PyTorch model is folded twice. The torch.fx rewrite (:mod:`bnfold.fold_torch`) folds what it
can; the folded model is exported (:mod:`bnfold.export`, which fuses nothing on its own), and the
ONNX rewrite (:mod:`bnfold.fold_onnx`) runs on the exported graph, where it catches batch norms
the PyTorch path kept: one after a functional ``F.conv2d``, a module kind the tracer does not look
into. :func:`combine` merges the two logs into one :class:`~bnfold.result.FoldResult` whose model
is the final ONNX graph:

* folded in PyTorch: the PyTorch row, stage ``"pytorch"``;
* an ONNX ``BatchNormalization`` node: the ONNX fold's verdict, under the PyTorch module it came
  from when the exporter recorded one (:attr:`bnfold.export.Exported.modules`), else under the
  ONNX node name. Folded there: stage ``"onnx"``. Kept there: stage ``"pytorch+onnx"`` with the
  PyTorch reason and the ONNX reason if PyTorch had kept it too, else stage ``"onnx"``;
* kept in PyTorch and not an ONNX ``BatchNormalization`` node (an ``InputNorm`` exported as
  ``Mul``/``Add``, a norm the forward never calls): the PyTorch row, stage ``"pytorch"``.

So ``kept == batchnorm nodes in the file + norms kept in PyTorch that are no BatchNormalization
node``, and :func:`check_against` verifies, node by node, that the rows decided in ONNX are
exactly the ``BatchNormalization`` nodes of the graph: the certificate never disagrees with the
file it is written into.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import onnx

from bnfold.errors import VerificationFailed
from bnfold.export import batchnorm_nodes
from bnfold.result import Folded, FoldResult, Skipped, Stage


def tag(result: FoldResult[Any], stage: Stage) -> FoldResult[Any]:
    """``result`` with every row marked as decided in ``stage``."""
    return FoldResult(result.model, [replace(f, stage=stage) for f in result.folded],
                      [replace(s, stage=stage) for s in result.skipped], list(result.notes))


def combine(pytorch: FoldResult[Any], onnx_fold: FoldResult[onnx.ModelProto],
            modules: dict[str, str]) -> FoldResult[onnx.ModelProto]:
    """Merge the PyTorch fold and the ONNX fold of its export (see the module docstring).

    ``modules`` maps ONNX node names to PyTorch module paths. Rows are named by module path;
    a module behind several ONNX nodes (applied twice), or one the PyTorch fold folded and that
    is still a node, is named ``"<module> (ONNX <node>)"`` per node.
    """
    kept_in_pytorch = {s.bn: s for s in pytorch.skipped}
    folded_in_pytorch = {f.bn for f in pytorch.folded}
    rows: list[Folded | Skipped] = [*onnx_fold.folded, *onnx_fold.skipped]
    owner = {r.bn: modules.get(r.bn, "") for r in rows}
    per_module = Counter(m for m in owner.values() if m)
    out: FoldResult[onnx.ModelProto] = FoldResult(
        onnx_fold.model, [replace(f, stage="pytorch") for f in pytorch.folded], [],
        [*pytorch.notes, *onnx_fold.notes])
    seen: set[str] = set()
    for row in rows:
        module = owner[row.bn]
        if not module:
            name = row.bn
        elif per_module[module] > 1 or module in folded_in_pytorch:
            name = f"{module} (ONNX {row.bn})"
        else:
            name = module
        before = kept_in_pytorch.get(module) if module else None
        if before is not None:
            seen.add(module)
        if isinstance(row, Folded):
            into = modules.get(row.into, row.into)
            out.folded.append(Folded(name, into, row.side, stage="onnx", node=row.bn))
        elif before is not None:
            out.skipped.append(Skipped(name, f"{before.reason}; in ONNX: {row.reason}", stage="pytorch+onnx",
                                       node=row.bn))
        else:
            out.skipped.append(Skipped(name, f"in ONNX: {row.reason}", stage="onnx", node=row.bn))
    out.skipped += [replace(s, stage="pytorch") for s in pytorch.skipped if s.bn not in seen]
    return out


def check_against(result: FoldResult[Any], model: onnx.ModelProto) -> int:
    """Raise :class:`VerificationFailed` unless the rows decided in ONNX match ``model``'s
    BatchNormalization nodes one to one; return how many such nodes ``model`` has.

    Precondition: ``result`` comes from :func:`combine` or :func:`tag` (every row has a stage).
    """
    in_graph = Counter(batchnorm_nodes(model))
    kept = Counter(s.node or s.bn for s in result.skipped if "onnx" in s.stage)
    still = sorted(f.bn for f in result.folded if "onnx" in f.stage and (f.node or f.bn) in in_graph)
    problems = []
    if kept != in_graph:
        problems.append(f"it keeps {sum(kept.values())} BatchNormalization nodes ({_names(kept)}) but the graph "
                        f"has {sum(in_graph.values())} ({_names(in_graph)})")
    if still:
        problems.append(f"it reports {', '.join(still)} folded but the graph still has them")
    if problems:
        raise VerificationFailed("the fold report disagrees with the ONNX graph: " + "; ".join(problems))
    return sum(in_graph.values())


def _names(counts: Counter[str]) -> str:
    return ", ".join(sorted(counts.elements())) or "none"
