"""``bnfold bench FILE``: latency of the unfolded vs the folded model."""

from __future__ import annotations

import argparse

from bnfold.cli import HelpFormatter, common_parser
from bnfold.cli.fold import add_load_options, add_output_options, load_options, status
from bnfold.cli.layout import Column, Table, console, emit, wrap
from bnfold.errors import BnfoldError

EXAMPLES = """\
examples:
  bnfold bench digits.pt
  bnfold bench digits.pt --batch 1 --batch 64 --repeats 200 --warmup 20
  bnfold bench model.onnx                        # onnxruntime only

Times are medians of interleaved runs (one call of each variant per round), in
milliseconds.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="compare latency before and after folding",
        description="Time the unfolded and the folded model in PyTorch eager and onnxruntime (graph "
        "optimizations off and on) at each batch size.",
    )
    p.add_argument("file", metavar="FILE", help="bnfold checkpoint, state_dict (.pt) or ONNX file (.onnx)")
    p.add_argument("--batch", type=int, action="append", dest="batches", metavar="N",
                   help="batch size (repeatable; default: 1 and 32)")
    p.add_argument("--repeats", type=int, default=50, help="timed rounds per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per variant first")
    p.add_argument("--threads", type=int, default=1, help="threads for every runtime (same budget for all)")
    add_load_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnfold.latency import bench

    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise BnfoldError(f"--repeats and --threads must be >= 1 and --warmup >= 0, got {args.repeats}, "
                          f"{args.threads} and {args.warmup}")
    batches = args.batches or [1, 32]
    if any(b < 1 for b in batches):
        raise BnfoldError(f"--batch must be >= 1, got {batches}")
    with status(args.quiet) as update:
        update(f"timing {args.file}")
        result = bench(args.file, load_options(args), batches=batches, repeats=args.repeats, warmup=args.warmup,
                       threads=args.threads)
    out = console()
    width = out.width
    lines = wrap(f"median latency (ms) of {args.file}, {args.repeats} interleaved rounds, {args.threads} "
                 "thread(s) per runtime:", width)
    if result.folded == 0:
        why = (f"its {result.kept} batch norm(s) are kept (bnfold inspect {args.file} says why)" if result.kept
               else "it has no batch norm (already folded?)")
        lines += wrap(f"note: nothing was folded: {why}. Unfolded and folded are the same model, so the speedups "
                      "below show only timing noise.", width, style="yellow")
    table = Table(Column("runtime", wrap=True), Column("batch", right=True), Column("unfolded", right=True),
                  Column("folded", right=True), Column("speedup", right=True))
    for row in result.rows:
        table.add_row(row.runtime, str(row.batch), f"{row.unfolded_ms:.3f}", f"{row.folded_ms:.3f}",
                      f"{row.speedup:.2f}x")
    emit(out, lines + table.render(width))
    return 0
