"""``bnfold fold INPUT -o OUT.onnx``: fold, verify, export, certify in one step.

Also holds the options the other model commands (inspect, verify, bench) share, and the
progress display; what is printed is laid out in :mod:`bnfold.cli.views`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bnfold.cli import HelpFormatter, common_parser, views
from bnfold.cli.layout import console, emit, wrap
from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from rich.console import Console

    from bnfold.pipeline import Config, FoldFailed, LoadOptions, Outcome
    from bnfold.quantize import QuantizeOptions, Report

EXAMPLES = """\
examples:
  bnfold fold digits.pt -o digits.onnx
  bnfold fold digits.pt --repository models --name digits --report report.json
  bnfold fold weights.pt --arch cnn --input-shape 3,32,32 -o model.onnx
  bnfold fold w.pt --model mymodels.py:build --input-shape 3,32,32 -o m.onnx
  bnfold fold model.onnx -o folded.onnx    # ONNX in: fold the graph itself
  bnfold fold digits.pt --quantize int8 --repository models --name digits
  bnfold fold digits.pt --quantize int8 --keep-float auto -o digits-int8.onnx

A bare state_dict needs its architecture (--arch, or --model for your own
factory) and, unless its weights fix it, the shape of one input sample
(--input-shape). Every destination is checked for writability before any work.
--quantize int8 quantizes the verified float model and writes the int8 one
only if it keeps >= --min-agreement top-1 agreement with the float model and
loses <= --max-accuracy-drop points of accuracy on the validation split.
exit codes: 0 success, 1 verification failed (only --report is written),
2 bad input or usage
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fold", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="fold batch norms, verify, export a certified ONNX model",
        description="Fold every batch norm that can be folded exactly, verify the result against a float64 "
        "reference, export to ONNX, fold what is left in the exported graph, verify that graph in onnxruntime "
        "against the original, and write it with a verification certificate in its metadata. Nothing is "
        "written unless every check passes (the report is, with passed: false).",
    )
    p.add_argument("input", metavar="INPUT", help="bnfold checkpoint, state_dict (.pt) or ONNX file (.onnx)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="write the certified ONNX model here")
    p.add_argument("--repository", metavar="DIR", help="also/instead write DIR/NAME/<next version>/model.onnx")
    p.add_argument("--name", metavar="NAME", help="model name in the repository")
    p.add_argument("--report", metavar="REPORT.json",
                   help="write every measurement as JSON (also when verification fails)")
    add_load_options(p)
    add_verify_options(p)
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (>= 17); the dynamo exporter writes 18 where a graph does not convert down")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="torch.onnx exporter: auto tries dynamo, then the deprecated torchscript (see bnfold.export)")
    add_quantize_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnfold import pipeline

    out = console()
    with status(args.quiet) as update:
        try:
            outcome = pipeline.run(
                args.input, output=args.output, repository_dir=args.repository, name=args.name, report=args.report,
                options=load_options(args), config=config(args, opset=args.opset, exporter=args.exporter),
                quantize=quantize_options(args), status=update,
            )
        except pipeline.FoldFailed as exc:
            update.stop()
            show_failure(out, exc, verbose=args.verbose, report=args.report)
            raise
    show_outcome(out, outcome, verbose=args.verbose)
    return 0


# ---------------------------------------------------------------------------------------------
# Options shared by the model commands


def parse_shape(text: str) -> tuple[int, ...]:
    """``3,32,32`` (or ``3x32x32``): one input sample's shape, without the batch axis."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,32,32 (channels, height, width), got {text!r}") \
            from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def add_load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading a bare state_dict")
    g.add_argument("--arch", metavar="NAME", help="bnfold architecture of a bare state_dict (cnn, mlp, resnet, ...)")
    g.add_argument("--input-shape", metavar="C,H,W", type=parse_shape,
                   help="shape of one input sample without the batch axis (3,32,32; 64 for tabular); needed for a "
                   "bare state_dict whose weights do not fix it, overrides what a checkpoint records")
    g.add_argument("--arch-config", metavar="JSON", help='architecture options, e.g. \'{"width": 16, "depth": 2}\'')
    g.add_argument("--model", metavar="MODULE:FACTORY", dest="model_factory",
                   help="your own factory returning the nn.Module the state_dict belongs to: mymodels:build "
                   "(imported from the current directory first) or path/to/file.py:build")


def add_verify_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification")
    g.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance, in output units")
    g.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance, times max |reference output|")
    g.add_argument("--samples", type=int, default=64, help="random N(0,1) inputs per check")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    g.add_argument("--data", metavar="NAME|PATH",
                   help="also verify on this data set's validation split (default: the checkpoint's own data set)")
    g.add_argument("--no-data", action="store_true", help="verify on random inputs only")


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="also show every batch norm and every comparison (the float32 baselines)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 quantization (--quantize int8)")
    g.add_argument("--quantize", choices=("int8",),
                   help="quantize the verified float model (QDQ, per-channel weights) and write the int8 model")
    g.add_argument("--calibration-data", metavar="NAME|PATH",
                   help="calibrate on this data set's training split (default: the checkpoint's own data set; "
                   "needed for an ONNX input); the formats of bnfold train --data")
    g.add_argument("--calibration-samples", type=int, default=256, metavar="N",
                   help="calibrate on at most N training samples (16 to 10000)")
    g.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="how activation ranges are chosen from the calibration samples")
    g.add_argument("--keep-float", metavar="auto|LAYER,...",
                   help="keep these layers in float; auto: the most sensitive ones, until the bounds hold")
    g.add_argument("--min-agreement", type=float, default=99.0, metavar="PERCENT",
                   help="least top-1 agreement with the float model on held-out samples, in percent")
    g.add_argument("--max-accuracy-drop", type=float, default=0.5, metavar="POINTS",
                   help="largest validation accuracy drop from the float model, in percentage points")


def quantize_options(args: argparse.Namespace) -> QuantizeOptions | None:
    """The quantization asked for, or ``None``; quantization options without ``--quantize`` are an error."""
    from bnfold.quantize import Bounds, QuantizeOptions

    given = [flag for flag, default in (("calibration_data", None), ("keep_float", None),
                                        ("calibration_samples", 256), ("calibration_method", "minmax"),
                                        ("min_agreement", 99.0), ("max_accuracy_drop", 0.5))
             if getattr(args, flag, default) != default]
    if getattr(args, "quantize", None) is None:
        if given:
            raise BnfoldError(f"--{given[0].replace('_', '-')} is an option of --quantize int8; add --quantize int8")
        return None
    if not 0 <= args.min_agreement <= 100:
        raise BnfoldError(f"--min-agreement is a percentage from 0 to 100, got {args.min_agreement}")
    if not 0 <= args.max_accuracy_drop <= 100:
        raise BnfoldError(f"--max-accuracy-drop is in percentage points from 0 to 100, got {args.max_accuracy_drop}")
    keep: tuple[str, ...] | str = ()
    if args.keep_float:
        keep = "auto" if args.keep_float == "auto" else tuple(n for n in args.keep_float.split(",") if n)
    return QuantizeOptions(method=args.calibration_method, samples=args.calibration_samples,
                           calibration_data=args.calibration_data, keep_float=keep,  # type: ignore[arg-type]
                           bounds=Bounds(min_agreement=args.min_agreement / 100,
                                         max_accuracy_drop=args.max_accuracy_drop / 100))


def load_options(args: argparse.Namespace) -> LoadOptions:
    from bnfold.pipeline import LoadOptions

    arch_config: dict[str, Any] | None = None
    if getattr(args, "arch_config", None):
        try:
            arch_config = json.loads(args.arch_config)
        except json.JSONDecodeError as exc:
            raise BnfoldError(f"--arch-config is not valid JSON ({exc.msg}): {args.arch_config!r}") from None
        if not isinstance(arch_config, dict):
            raise BnfoldError(f"--arch-config must be a JSON object, got {args.arch_config!r}")
    return LoadOptions(arch=args.arch, arch_config=arch_config, model_factory=args.model_factory,
                       input_shape=args.input_shape)


def config(args: argparse.Namespace, **extra: Any) -> Config:
    from bnfold.pipeline import Config
    from bnfold.tolerance import Tolerance

    for flag in ("atol", "rtol"):
        value = getattr(args, flag)
        if not value >= 0:
            raise BnfoldError(f"--{flag} must be >= 0, got {value}")
    if args.samples < 1:
        raise BnfoldError(f"--samples must be >= 1, got {args.samples}")
    return Config(tolerance=Tolerance(atol=args.atol, rtol=args.rtol), n_random=args.samples, seed=args.seed,
                  data=args.data, use_data=not args.no_data, **extra)


# ---------------------------------------------------------------------------------------------
# Presentation


class _Progress:
    """The callable the pipeline reports its steps to; ``stop()`` ends a spinner before other output."""

    def __init__(self, show: Callable[[str], None], stop: Callable[[], None] = lambda: None) -> None:
        self._show, self.stop = show, stop

    def __call__(self, message: str) -> None:
        self._show(message)


@contextmanager
def status(quiet: bool = False) -> Iterator[_Progress]:
    """Progress of the pipeline on stderr: a spinner on a terminal, else one plain line per step
    (``[  2.1s] exporting to ONNX``, for logs and pipes); nothing with ``quiet``."""
    from rich.text import Text

    err = console(stderr=True)
    if quiet:
        yield _Progress(lambda _message: None)
        return
    if not err.is_terminal:
        start = time.perf_counter()

        def line(message: str) -> None:
            err.print(Text(f"[{time.perf_counter() - start:5.1f}s] {message}"))
            err.file.flush()

        yield _Progress(line)
        return
    spinner = err.status("starting")
    spinner.start()
    try:
        yield _Progress(lambda message: spinner.update(Text(message)), spinner.stop)
    finally:
        spinner.stop()


def show_outcome(out: Console, outcome: Outcome, *, verbose: bool = False) -> None:
    from bnfold.cli import wall_seconds

    width = out.width
    lines = [*views.source_line(outcome.source, width), *views.fold_summary(outcome.fold, width, verbose=verbose),
             *views.notes([*outcome.fold.notes, *outcome.notes], width),
             *views.verification(views.checks_of(outcome.checks), _float_tolerance(outcome), width,
                                 verbose=verbose),
             *views.artifact(outcome, width, total_s=wall_seconds())]
    report = getattr(outcome, "quantization", None)
    if report is not None:
        at = _artifact_start(lines)
        lines = [*lines[:at], *quantization(report, width), *lines[at:]]
    emit(out, lines)


def _float_tolerance(outcome: Outcome) -> Any:
    """The float checks' tolerance (an int8 outcome's certificate carries the int8 self-test's)."""
    float_certificate = getattr(outcome, "float_certificate", None)
    return (float_certificate or outcome.certificate).tolerance


def _artifact_start(lines: list[Any]) -> int:
    return next((i for i, line in enumerate(lines) if str(line) == "artifact:"), len(lines))


def quantization(report: Report, width: int) -> list[Any]:
    """The int8 contract: a verdict, the measured numbers, the layers kept in float and, on a miss, sensitivity."""
    from bnfold.cli.layout import Column, Table, key_values, number, percent

    final, bounds = report.final, report.options.bounds
    m = final.measured
    verdict = "passed" if final.passed else "FAILED"
    lines = wrap(f"int8: {verdict}, {report.options.method} calibration on {report.calibration}", width,
                 style="bold green" if final.passed else "bold red")
    drop = m.accuracy_drop
    rows: list[tuple[str, Any]] = [
        ("top-1 agreement", f"{m.agreement:.2%} with the float model on {m.samples} {m.inputs} samples "
                            f"(at least {bounds.min_agreement:.2%})"),
        ("accuracy", "not measured (no labels that mean the outputs): agreement only" if drop is None else
         f"{m.float_accuracy:.2%} float, {m.int8_accuracy:.2%} int8: drop {drop * 100:.2f} points "
         f"(at most {bounds.max_accuracy_drop * 100:g})"),
        ("kept in float", ", ".join(final.kept_float) or "none"),
    ]
    for path, comparison in report.selftests.items():
        rows.append((f"self-test, {path}", f"max abs error {number(comparison.max_abs)} (allowed "
                                           f"{number(comparison.allowed)}: 4 output quantization steps)"))
    lines += key_values(rows, width)
    if report.sensitivity:
        lines += wrap("sensitivity: each layer alone kept in float, most sensitive first", width)
        table = Table(Column("layer", wrap=True), Column("op"), Column("top-1", right=True),
                      Column("accuracy", right=True), Column("error", right=True))
        for row in report.sensitivity[:12]:
            table.add_row(row.name, row.op, percent(row.measured.agreement), percent(row.measured.int8_accuracy),
                          number(row.measured.mean_abs_error))
        lines += table.render(width)
        lines += wrap(f"error: mean |int8 - float| output; {len(report.sensitivity)} layers measured"
                      + ("" if report.options.keep_float == "auto" else "; --keep-float auto keeps the most "
                         "sensitive ones in float until the bounds hold"), width, indent=2)
    return lines


def show_failure(out: Console, exc: FoldFailed, *, verbose: bool, report: str | None) -> None:
    width = out.width
    lines = views.source_line(exc.source, width)
    if exc.fold is not None:
        lines += views.fold_summary(exc.fold, width, verbose=verbose)
    lines += views.notes([*exc.source.notes, *exc.notes], width)
    lines += views.verification(views.checks_of(exc.checks), exc.tolerance, width, verbose=verbose)
    quantized = getattr(exc, "report", None)
    if quantized is not None:
        lines += quantization(quantized, width)
        lines += wrap(f"int8: {exc}", width, style="red")
    if report:
        lines += wrap(f"wrote {report} (passed: false, every measurement); no model was written", width)
    emit(out, lines)
