"""``bnfold fold INPUT -o OUT.onnx``: fold, verify, export, certify in one step.

Also holds the options and tables the other model commands (inspect, verify, bench) share.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bnfold.cli import HelpFormatter, common_parser
from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from bnfold.pipeline import Config, LoadOptions, Outcome, Status
    from bnfold.result import FoldResult
    from bnfold.verification import VerifyReport

EXAMPLES = """\
examples:
  bnfold fold digits.pt -o digits.onnx
  bnfold fold digits.pt --repository models --name digits --report report.json
  bnfold fold weights.pt --arch cnn --arch-config '{"width": 16}' -o model.onnx
  bnfold fold weights.pt --model mypkg.models:build -o model.onnx --data data.npz
  bnfold fold model.onnx -o folded.onnx          # ONNX in: fold the graph itself

exit codes: 0 success, 1 verification failed (nothing written), 2 bad input or usage
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fold", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="fold batch norms, verify, export a certified ONNX model",
        description="Fold every batch norm that can be folded exactly, verify the result against a float64 "
        "reference, export to ONNX, fold what is left in the exported graph, verify that graph in onnxruntime "
        "against the original, and write it with a verification certificate in its metadata. Nothing is "
        "written unless every check passes.",
    )
    p.add_argument("input", metavar="INPUT", help="bnfold checkpoint, state_dict (.pt) or ONNX file (.onnx)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="write the certified ONNX model here")
    p.add_argument("--repository", metavar="DIR", help="also/instead write DIR/NAME/<next version>/model.onnx")
    p.add_argument("--name", metavar="NAME", help="model name in the repository")
    p.add_argument("--report", metavar="REPORT.json", help="write every measurement as JSON")
    add_load_options(p)
    add_verify_options(p)
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (>= 17); the dynamo exporter writes 18 where a graph does not convert down")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="torch.onnx exporter: auto tries dynamo, then the deprecated torchscript (see bnfold.export)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnfold import pipeline

    console = _console()
    with status(console) as update:
        outcome = pipeline.run(
            args.input, output=args.output, repository_dir=args.repository, name=args.name, report=args.report,
            options=load_options(args), config=config(args, opset=args.opset, exporter=args.exporter),
            status=update,
        )
    show_outcome(console, outcome)
    return 0


# ---------------------------------------------------------------------------------------------
# Options shared by the model commands


def add_load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading a bare state_dict")
    g.add_argument("--arch", metavar="NAME", help="bnfold architecture of a bare state_dict (cnn, mlp, resnet, ...)")
    g.add_argument("--arch-config", metavar="JSON", help='architecture options, e.g. \'{"width": 16, "depth": 2}\'')
    g.add_argument("--model", metavar="PKG.MODULE:FACTORY", dest="model_factory",
                   help="your own factory returning the nn.Module the state_dict belongs to")


def add_verify_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification")
    g.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance, in output units")
    g.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance, times max |reference output|")
    g.add_argument("--samples", type=int, default=64, help="random N(0,1) inputs per check")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    g.add_argument("--data", metavar="NAME|PATH",
                   help="also verify on this data set's validation split; unset: the checkpoint's own data set")
    g.add_argument("--no-data", action="store_true", help="verify on random inputs only")


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
    return LoadOptions(arch=args.arch, arch_config=arch_config, model_factory=args.model_factory)


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


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: do not wrap the tables into slivers
    return console


@contextmanager
def status(console: Console) -> Iterator[Status]:
    """A spinner on stderr whose text the pipeline updates; silent when stderr is not a terminal."""
    err = _console(stderr=True)
    if not err.is_terminal:
        yield lambda _message: None
        return
    with err.status("starting") as spinner:
        yield lambda message: spinner.update(message)


STAGES = {"pytorch": "PyTorch", "onnx": "ONNX", "pytorch+onnx": "PyTorch+ONNX"}


def fold_table(result: FoldResult[Any], title: str = "batch norms") -> Table:
    """One row per batch norm; a ``stage`` column (where it was folded or kept) when rows have one."""
    from rich.table import Table

    counts = result.counts
    rows = result.staged_rows()
    staged = any(stage for _, _, stage, _ in rows)
    table = Table(title=f"{title}: {counts['folded']} folded, {counts['kept']} kept", title_justify="left")
    table.add_column("batch norm", overflow="fold")
    table.add_column("status")
    if staged:
        table.add_column("stage")
    table.add_column("into / why kept", overflow="fold")
    for bn, state, stage, detail in rows:
        cells = [bn, f"[green]{state}[/]" if state == "folded" else f"[yellow]{state}[/]"]
        table.add_row(*cells, *([STAGES.get(stage, stage)] if staged else []), detail)
    if not rows:
        table.add_row("(none)", "", "the model has no batch normalization")
    return table


def verify_table(checks: list[tuple[str, VerifyReport]], title: str = "verification") -> Table:
    """One row per comparison of every report (gating rows first), with the verdict."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("runtime", "inputs", "n", "compared with", "max abs err", "max rel err", "allowed", "top-1",
                "result"):
        table.add_column(col, justify="right" if col in ("n", "max abs err", "max rel err", "allowed") else "left")
    for stage, rep in checks:
        for row in rep.rows:
            top1 = "n/a" if row.top1_agreement is None else f"{row.top1_agreement:.2%}"
            verdict = ("[green]pass[/]" if row.passed else "[red]FAIL[/]") if row.gating else "[dim]baseline[/]"
            table.add_row(stage, rep.inputs, str(rep.n_samples), f"{row.actual} vs {row.reference}",
                          f"{row.max_abs_error:.3g}", f"{row.max_rel_error:.3g}", f"{row.allowed:.3g}", top1, verdict)
    return table


def show_outcome(console: Console, outcome: Outcome) -> None:
    from rich.table import Table

    src = outcome.source
    console.print(f"[bold]{src.path}[/] ({src.kind}, {src.architecture}, input {src.input_shape}, "
                  f"{len(src.class_labels)} classes)")
    console.print(fold_table(outcome.fold))
    for note in [*outcome.fold.notes, *outcome.notes]:
        console.print(f"note: {note}")
    console.print(verify_table([(c.stage, c.report) for c in outcome.checks]))
    summary = Table(title="artifact", title_justify="left", show_header=False)
    summary.add_column("key")
    summary.add_column("value")
    ops = ", ".join(f"{op} {n}" for op, n in outcome.to_dict()["onnx"]["ops"].items())
    summary.add_row("ONNX ops", ops)
    summary.add_row("BatchNormalization nodes", str(outcome.batchnorm_nodes))
    if outcome.exported is not None:
        exported = outcome.exported
        asked = "" if exported.opset == outcome.requested_opset else f" ({outcome.requested_opset} asked for)"
        summary.add_row("exporter", exported.exporter + (" (fallback, see note)" if exported.fallback else ""))
        summary.add_row("opset", f"{exported.opset}{asked}")
    summary.add_row("certificate self-test", f"max abs error {outcome.selftest.max_abs:.3g} "
                    f"(allowed {outcome.selftest.allowed:.3g}): {'pass' if outcome.selftest.passed else 'FAIL'}")
    summary.add_row("time", ", ".join(f"{k} {v:.2f}s" for k, v in outcome.timings.items()))
    for path in outcome.written:
        summary.add_row("wrote", path)
    console.print(summary)
