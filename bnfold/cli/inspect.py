"""``bnfold inspect FILE``: what the model is and what folding would do to it (writes nothing)."""

from __future__ import annotations

import argparse
import json

from bnfold.cli import HelpFormatter, common_parser
from bnfold.cli.fold import _console, add_load_options, fold_table, load_options

EXAMPLES = """\
examples:
  bnfold inspect digits.pt
  bnfold inspect weights.pt --arch resnet
  bnfold inspect models/digits/1/model.onnx      # also shows the certificate
  bnfold inspect digits.pt --json
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="show a model's layers and its batch-norm fold plan",
        description="Summarize a checkpoint or ONNX model (layers, parameters, input shape, class labels) and "
        "list every batch norm with what it would be folded into, or why it would be kept. Writes nothing.",
    )
    p.add_argument("file", metavar="FILE", help="bnfold checkpoint, state_dict (.pt) or ONNX file (.onnx)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    add_load_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bnfold.pipeline import inspect_file

    info = inspect_file(args.file, load_options(args))
    console = _console()
    if args.json:
        console.print_json(json.dumps(info.to_dict()))
        return 0
    src = info.source
    summary = Table(title=str(src.path), title_justify="left", show_header=False)
    summary.add_column("key")
    summary.add_column("value")
    summary.add_row("kind", src.kind + (f" (opset {info.opset})" if info.opset else ""))
    summary.add_row("architecture", src.architecture)
    summary.add_row("input shape", f"(batch, {', '.join(map(str, src.input_shape))})")
    labels = ", ".join(src.class_labels[:20]) + (" ..." if len(src.class_labels) > 20 else "")
    summary.add_row("class labels", f"{len(src.class_labels)}: {labels}" if src.class_labels else "unknown")
    if src.dataset:
        summary.add_row("data set", src.dataset)
    summary.add_row("parameters", f"{info.parameters:,}")
    summary.add_row("layers" if src.kind == "checkpoint" else "ops",
                    ", ".join(f"{name} {n}" for name, n in info.layer_counts.items()))
    summary.add_row("sha256", src.sha256)
    console.print(summary)
    console.print(fold_table(info.fold, title="fold plan"))
    for note in info.fold.notes:
        console.print(f"note: {note}")
    if info.certificate is not None:
        cert = info.certificate
        table = Table(title="certificate", title_justify="left", show_header=False)
        table.add_column("key")
        table.add_column("value")
        table.add_row("bnfold version", cert.bnfold_version)
        table.add_row("source sha256", cert.source_sha256)
        table.add_row("folded / kept", f"{cert.folded} / {cert.kept}")
        if cert.batchnorm_nodes is not None:
            agrees = cert.batchnorm_nodes == info.batchnorm_nodes
            table.add_row("BatchNormalization nodes", f"{cert.batchnorm_nodes}" + (
                ", as in the file" if agrees else f" [red]but the file has {info.batchnorm_nodes}[/]"))
        if cert.opset is not None:
            table.add_row("opset, exporter", f"{cert.opset}, {cert.exporter or 'none (ONNX input)'}")
        table.add_row("tolerance", f"atol {cert.tolerance.atol:g}, rtol {cert.tolerance.rtol:g}")
        for key, err in cert.errors.items():
            top1 = err.get("top1_agreement")
            table.add_row(key, f"max abs {err.get('max_abs_error', float('nan')):.3g} on {err.get('n_samples')} "
                          f"samples, top-1 {'n/a' if top1 is None else f'{top1:.2%}'}")
        if info.selftest is not None:
            verdict = "[green]reproduces[/]" if info.selftest.passed else "[red]DOES NOT REPRODUCE[/]"
            table.add_row("self-test", f"{len(cert.selftest_input)} samples, {verdict} in onnxruntime: max abs error "
                          f"{info.selftest.max_abs:.3g} (allowed {info.selftest.allowed:.3g})")
        console.print(table)
    return 0
