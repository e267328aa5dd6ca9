"""What the model commands print: fold summary, verification summary, the artifact, as lines.

Everything is laid out with :mod:`bnfold.cli.layout` for the console's width. The default view is
short: one line for the batch norms (plus one per batch norm kept, with the reason), and one row
per comparison that decides the verdict (each candidate model against the float64 reference, on
validation data and on random inputs) with the allowed bound spelled out. ``--verbose`` adds the
per-batch-norm table and the full matrix (the float32 baselines and the folded-vs-float32 rows);
the JSON report always has everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold.cli.layout import INDENT, Cell, Column, Table, key_values, number, percent, wrap

if TYPE_CHECKING:
    from rich.text import Text

    from bnfold.pipeline import Check, Outcome, Source
    from bnfold.result import FoldResult
    from bnfold.tolerance import Tolerance
    from bnfold.verification import VerifyReport

STAGES = {"pytorch": "PyTorch", "onnx": "ONNX", "pytorch+onnx": "PyTorch+ONNX"}
STEPS = {"load": "load", "inputs": "data", "fold": "fold", "verify": "verify", "export": "export",
         "fold_onnx": "ONNX fold", "verify_onnx": "ONNX verify", "certify": "certify", "write": "write"}


def source_line(src: Source, width: int) -> list[Text]:
    shape = "x".join(map(str, src.input_shape))
    if src.class_labels:
        classes = f"{len(src.class_labels)} classes"
    elif src.num_outputs:
        classes = f"{src.num_outputs} outputs (no class labels)"
    else:
        classes = "outputs unknown"
    trained = f", trained on {src.dataset}" if src.dataset else ""
    kind = "checkpoint" if src.kind == "checkpoint" else "ONNX file"
    return wrap(f"{src.path}: {src.architecture} {kind}, input {shape}, {classes}{trained}", width)


def fold_summary(result: FoldResult[Any], width: int, *, verbose: bool = False,
                 title: str = "batch norms") -> list[Text]:
    """``batch norms: 5 of 5 folded (...)``, one wrapped line per batch norm kept, the full table if verbose."""
    rows = result.staged_rows()
    counts = result.counts
    if not rows:
        return wrap(f"{title}: none (the model has no batch normalization)", width)
    where: dict[str, int] = {}
    for _, state, stage, _ in rows:
        if state == "folded" and stage:
            where[STAGES.get(stage, stage)] = where.get(STAGES.get(stage, stage), 0) + 1
    places = f" ({', '.join(f'{n} in {s}' for s, n in where.items())})" if where else ""
    total = counts["folded"] + counts["kept"]
    kept = f", {counts['kept']} kept" + (":" if counts["kept"] and not verbose else "")
    out = wrap(f"{title}: {counts['folded']} of {total} folded{places}{kept}", width)
    if verbose:
        staged = any(stage for _, _, stage, _ in rows)
        table = Table(Column("batch norm", wrap=True), Column("status"),
                      *([Column("stage")] if staged else []), Column("into / why kept", wrap=True))
        for bn, state, stage, detail in rows:
            cells: list[Cell] = [bn, (state, "green" if state == "folded" else "yellow")]
            table.add_row(*cells, *([STAGES.get(stage, stage)] if staged else []), detail)
        return out + table.render(width)
    for bn, state, stage, detail in rows:
        if state == "kept":
            at = f" ({STAGES[stage]})" if stage in STAGES else ""
            out += wrap(f"{bn}{at}: {detail}", width, indent=INDENT)
    return out


def notes(items: list[str], width: int) -> list[Text]:
    return [line for note in items for line in wrap(f"note: {note}", width)]


def _model_label(stage: str, rep: VerifyReport) -> str:
    if stage == "pytorch":
        return "folded, PyTorch"
    if stage == "onnxruntime":
        return "exported ONNX" if rep.rows and rep.rows[0].actual.startswith("onnx") else "folded ONNX"
    return rep.rows[0].actual if rep.rows else rep.inputs


def _inputs_kind(rep: VerifyReport) -> str:
    return "random" if rep.inputs == "random" else "validation"


def _reference_words(reference: str) -> str:
    return {"original (float64)": "the original model computed in float64",
            "original": "the original ONNX model"}.get(reference, reference)


def verification(checks: list[tuple[str, VerifyReport]], tolerance: Tolerance, width: int, *,
                 verbose: bool = False) -> list[Text]:
    """The compact summary: a verdict line, what "error" and "allowed" mean, one row per deciding check."""
    if not checks:
        return wrap("verification: nothing was verified", width)
    failed = [rep for _, rep in checks if not rep.passed]
    verdict = (f"verification: FAILED, {len(failed)} of {len(checks)} checks over the allowed error" if failed
               else f"verification: passed, {len(checks)} of {len(checks)} checks within the allowed error")
    out = wrap(verdict, width, style="bold red" if failed else "bold green")
    references = sorted({rep.reference for _, rep in checks})
    out += wrap(f"error: the largest |output - reference| over all samples, the reference being "
                f"{' / '.join(_reference_words(r) for r in references)}; allowed: {tolerance.atol:g} + "
                f"{tolerance.rtol:g} x the largest |reference output| (--atol, --rtol)", width, indent=INDENT)
    table = Table(Column("model", wrap=True), Column("inputs"), Column("n", right=True),
                  Column("error", right=True), Column("allowed", right=True), Column("top-1", right=True),
                  Column("result"))
    for stage, rep in checks:
        table.add_row(_model_label(stage, rep), _inputs_kind(rep), str(rep.n_samples), number(rep.max_abs_error),
                      number(rep.allowed), percent(rep.top1_agreement),
                      ("pass", "green") if rep.passed else ("FAIL", "bold red"))
    out += table.render(width)
    seen: dict[str, VerifyReport] = {}
    for _, rep in checks:
        seen.setdefault(rep.inputs, rep)
    described = [f"{rep.n_samples} samples of the {rep.inputs.removesuffix(' validation')} validation split"
                 if rep.inputs != "random" else f"{rep.n_samples} random N(0,1) samples (--samples, --seed)"
                 for rep in seen.values()]
    out += wrap(f"inputs: {'; '.join(described)}", width, indent=INDENT)
    baselines = [(rep.inputs, row.max_abs_error) for rep in seen.values() for row in rep.rows
                 if not row.gating and row.reference.endswith("(float64)") and row.actual != rep.rows[0].actual]
    if baselines:
        shown = " and ".join(f"{number(err)} ({_inputs_kind_name(inputs)})" for inputs, err in baselines)
        out += wrap(f"for scale: the unfolded model in float32 is off from float64 by {shown}"
                    + ("" if verbose else "; --verbose shows every comparison"), width, indent=INDENT)
    for stage, rep in checks:
        if not rep.passed:
            out += wrap(f"{_model_label(stage, rep)} on {_inputs_kind(rep)} inputs: {rep.reason}", width,
                        indent=INDENT, style="red")
    if verbose:
        out += matrix(checks, width)
    return out


def _inputs_kind_name(inputs: str) -> str:
    return "random" if inputs == "random" else "validation"


def matrix(checks: list[tuple[str, VerifyReport]], width: int) -> list[Text]:
    """Every comparison of every check: the deciding row and the float32 baselines shown for scale."""
    out = wrap("every comparison (baseline rows are shown for scale and decide nothing):", width)
    for stage, rep in checks:
        out += wrap(f"{_model_label(stage, rep)} on {rep.inputs} ({rep.n_samples} samples), allowed "
                    f"{number(rep.allowed)}:", width)
        table = Table(Column("compared", wrap=True), Column("max abs", right=True), Column("max rel", right=True),
                      Column("top-1", right=True), Column("role"))
        for row in rep.rows:
            role = (("pass", "green") if row.passed else ("FAIL", "bold red")) if row.gating else ("baseline", "dim")
            table.add_row(f"{row.actual} vs {row.reference}", number(row.max_abs_error), number(row.max_rel_error),
                          percent(row.top1_agreement), role)
        out += table.render(width)
    return out


def checks_of(checks: list[Check]) -> list[tuple[str, VerifyReport]]:
    return [(c.stage, c.report) for c in checks]


def artifact(outcome: Outcome, width: int, *, total_s: float | None = None) -> list[Text]:
    """What was written and how: ONNX ops, exporter and opset, the certificate's self-test, the time."""
    ops = outcome.to_dict()["onnx"]["ops"]
    nodes = sum(ops.values())
    bn = outcome.batchnorm_nodes
    rows: list[tuple[str, Any]] = [
        ("ONNX graph", f"{nodes} nodes: " + ", ".join(f"{op} {n}" for op, n in ops.items())),
        ("BatchNormalization nodes", str(bn)),
    ]
    if outcome.exported is not None:
        exported = outcome.exported
        asked = "" if exported.opset == outcome.requested_opset else f" ({outcome.requested_opset} asked for)"
        rows.append(("exporter", exported.exporter + (" (fallback, see note)" if exported.fallback else "")))
        rows.append(("opset", f"{exported.opset}{asked}"))
    selftest = outcome.selftest
    rows.append(("certificate self-test", (f"{'passes' if selftest.passed else 'FAILS'}: max abs error "
                                           f"{number(selftest.max_abs)} (allowed {number(selftest.allowed)})",
                                           "" if selftest.passed else "red")))
    rows.append(("time", timing(outcome.timings, total_s)))
    for path in outcome.written:
        rows.append(("wrote", path))
    return wrap("artifact:", width) + key_values(rows, width)


def timing(timings: dict[str, float], total_s: float | None) -> str:
    """``15.3 s: start-up 0.8, load 3.3, ...``; the first step to use a library pays for importing it
    (load: torch, fold: torch.fx and dynamo, export: torch.onnx and onnxscript)."""
    steps = ", ".join(f"{STEPS.get(k, k)} {v:.1f}" for k, v in timings.items())
    if total_s is None:
        return f"{steps} s"
    other = max(total_s - sum(timings.values()), 0.0)
    return f"{total_s:.1f} s: start-up {other:.1f}, {steps}"
