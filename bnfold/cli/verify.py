"""``bnfold verify A B``: are two models (checkpoint or ONNX, any mix) the same function?"""

from __future__ import annotations

import argparse
import json

from bnfold.cli import HelpFormatter, common_parser, views
from bnfold.cli.fold import add_load_options, add_output_options, add_verify_options, config, load_options, status
from bnfold.cli.layout import console, emit, wrap
from bnfold.errors import BnfoldError, VerificationFailed

EXAMPLES = """\
examples:
  bnfold verify digits.pt digits.onnx
  bnfold verify digits.pt models/digits/1/model.onnx --report verify.json
  bnfold verify a.onnx b.onnx --atol 1e-6 --rtol 1e-5

A is the reference: when it is a PyTorch model, both are also compared with a
float64 copy of A.
exit codes: 0 equivalent within tolerance, 1 not equivalent, 2 bad input/usage
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="check that two models compute the same outputs",
        description="Run two models (checkpoint/state_dict or ONNX, any mix) on the same random inputs and, "
        "when a data set is known, on its validation split; report max abs/rel error and top-1 agreement.",
    )
    p.add_argument("a", metavar="A", help="reference model (checkpoint or .onnx)")
    p.add_argument("b", metavar="B", help="model to check (checkpoint or .onnx)")
    p.add_argument("--report", metavar="REPORT.json", help="write the comparison as JSON (also when they differ)")
    add_load_options(p)
    add_verify_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bnfold import atomic
    from bnfold.pipeline import compare_files

    if args.report:
        for model in (args.a, args.b):
            if Path(model).exists() and Path(args.report).exists() and Path(args.report).samefile(model):
                raise BnfoldError(f"report {args.report!r} is the model file {model!r}; write to another file")
        atomic.check_writable(args.report, "report")
    cfg = config(args)
    with status(args.quiet) as update:
        update(f"comparing {args.b} with {args.a}")
        reports = compare_files(args.a, args.b, options=load_options(args), config=cfg)
    out = console()
    lines = wrap(f"{args.b} vs {args.a}:", out.width)
    lines += views.verification([("", rep) for rep in reports], cfg.tolerance, out.width, verbose=args.verbose)
    if args.report:
        body = {"a": args.a, "b": args.b, "passed": all(r.passed for r in reports),
                "checks": {r.inputs: r.to_dict() for r in reports}}
        atomic.write_bytes(args.report, (json.dumps(body, indent=2) + "\n").encode(), "report")
        lines += wrap(f"wrote {args.report}", out.width)
    emit(out, lines)
    failed = [r for r in reports if not r.passed]
    if failed:
        raise VerificationFailed(f"{args.b} differs from {args.a}: " + failed[0].summary())
    return 0
