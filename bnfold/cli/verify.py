"""``bnfold verify A B``: are two models (checkpoint or ONNX, any mix) the same function?"""

from __future__ import annotations

import argparse
import json

from bnfold import atomic
from bnfold.cli import HelpFormatter, common_parser
from bnfold.cli.fold import _console, add_load_options, add_verify_options, config, load_options, verify_table
from bnfold.errors import BnfoldError, VerificationFailed

EXAMPLES = """\
examples:
  bnfold verify digits.pt digits.onnx
  bnfold verify digits.pt models/digits/1/model.onnx --data digits --report verify.json
  bnfold verify a.onnx b.onnx --atol 1e-6 --rtol 1e-5

A is the reference: when it is a PyTorch model, both are also compared with a float64 copy of A.
exit codes: 0 equivalent within tolerance, 1 not equivalent, 2 bad input or usage
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
    p.add_argument("--report", metavar="REPORT.json", help="write the comparison as JSON")
    add_load_options(p)
    add_verify_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bnfold.pipeline import compare_files

    if args.report and not Path(args.report).parent.is_dir():
        raise BnfoldError(f"report directory {Path(args.report).parent} does not exist")
    reports = compare_files(args.a, args.b, options=load_options(args), config=config(args))
    console = _console()
    console.print(verify_table([("", rep) for rep in reports], title=f"{args.b} vs {args.a}"))
    if args.report:
        body = {"a": args.a, "b": args.b, "passed": all(r.passed for r in reports),
                "checks": {r.inputs: r.to_dict() for r in reports}}
        atomic.write_bytes(args.report, (json.dumps(body, indent=2) + "\n").encode())
    for rep in reports:
        console.print(rep.summary())
    failed = [r for r in reports if not r.passed]
    if failed:
        raise VerificationFailed(f"{args.b} differs from {args.a}: " + failed[0].summary())
    return 0
