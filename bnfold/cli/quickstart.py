"""``bnfold quickstart``: train the default digits model, fold, verify, export, serve it."""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bnfold.cli import HelpFormatter, common_parser
from bnfold.cli.fold import add_quantize_options, quantize_options, show_outcome, status
from bnfold.cli.layout import console, emit, wrap

EXAMPLES = """\
examples:
  bnfold quickstart            # train, fold, write models/digits/<v>/model.onnx
                               # and serve it on :8000
  bnfold quickstart --no-serve # stop after writing the model
  bnfold quickstart --repository /tmp/models --port 9000 --checkpoint digits.pt
  bnfold quickstart --quantize int8  # the next version is the int8 model
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quickstart", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="train, fold, verify, export and serve the default digits model",
        description="Train the default model on the bundled digits data set (bnfold.train defaults), fold its "
        "batch norms, verify, export a certified ONNX model into the model repository as the next version of "
        "NAME, then serve the repository and print a curl example.",
    )
    p.add_argument("--repository", metavar="DIR", default="models", help="model repository to write into")
    p.add_argument("--name", default="digits", help="model name in the repository")
    p.add_argument("--arch", default="cnn", help="architecture to train")
    p.add_argument("--epochs", type=int, help="training epochs (default: the architecture's default)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--checkpoint", metavar="PATH", help="also keep the trained checkpoint here")
    p.add_argument("--report", metavar="REPORT.json", help="write the fold/verify measurements as JSON")
    p.add_argument("--no-serve", action="store_true", help="do not start the service")
    p.add_argument("--host", default="127.0.0.1", help="service bind address")
    p.add_argument("--port", type=int, default=8000, help="service port")
    add_quantize_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnfold import atomic, pipeline
    from bnfold.train import TrainConfig, save_result, train

    pipeline.check_destinations(repository_dir=args.repository, name=args.name, report=args.report)
    quantize = quantize_options(args)
    if args.checkpoint:
        atomic.check_writable(args.checkpoint, "checkpoint")
    out = console()
    width = out.width
    emit(out, wrap(f"1/3 training {args.arch} on digits", width, style="bold"))
    result = train(TrainConfig(arch=args.arch, dataset="digits", epochs=args.epochs, seed=args.seed), progress=True)
    if result.interrupted:
        raise KeyboardInterrupt
    emit(out, wrap(f"validation accuracy {result.best_val_accuracy:.2%} (epoch {result.best_epoch}, "
                   f"{result.seconds:.1f}s)", width))
    emit(out, wrap("2/3 folding, verifying, exporting" + (", quantizing to int8" if quantize else ""), width,
                   style="bold"))
    with tempfile.TemporaryDirectory(prefix="bnfold-quickstart-") as tmp:
        checkpoint = args.checkpoint or str(Path(tmp) / f"{args.name}.pt")
        save_result(result, checkpoint)
        with status() as update:
            outcome = pipeline.run(checkpoint, repository_dir=args.repository, name=args.name, report=args.report,
                                   quantize=quantize, status=update)
    show_outcome(out, outcome)
    model_file = Path(outcome.written[0])
    version = model_file.parent.name
    url = f"http://{args.host}:{args.port}"
    sample = outcome.certificate.selftest_input[:1]
    body = {"inputs": [{"name": outcome.certificate.input_name, "shape": list(sample.shape), "datatype": "FP32",
                        "data": [round(float(v), 4) for v in sample.ravel()]}]}
    curl = _curl(f"{url}/v2/models/{args.name}/versions/{version}/infer", body, width)
    if args.no_serve:
        serve_cmd = f"bnfold serve --model-repository {args.repository}"
        emit(out, wrap(f"3/3 wrote {model_file}; serve it with: {serve_cmd}", width, style="bold"))
        emit(out, ["then try:", *curl])
        return 0
    from service.config import Settings
    from service.main import run as serve

    emit(out, wrap(f"3/3 serving {args.repository} at {url} (Ctrl-C to stop); try:", width, style="bold"))
    emit(out, curl)
    serve(Settings(model_repository=Path(args.repository), host=args.host, port=args.port))
    return 0


def _curl(url: str, body: Mapping[str, Any], width: int) -> list[str]:
    """A curl command that fits ``width`` and still pastes: shell line continuations up to the body,
    then the JSON body broken after commas inside its quotes (JSON allows the newlines)."""
    head = [f"curl -s -X POST {url} \\", "  -H 'Content-Type: application/json' -d \\"]
    text = "'" + json.dumps(body, separators=(", ", ":")) + "'"
    return head + textwrap.wrap(text, max(width - 2, 40), initial_indent="  ", subsequent_indent="  ",
                                break_long_words=False, break_on_hyphens=False)
