"""``bnfold inspect FILE``: what the model is and what folding would do to it (writes nothing)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bnfold.cli import HelpFormatter, common_parser, views
from bnfold.cli.fold import add_load_options, add_output_options, load_options, status
from bnfold.cli.layout import console, emit, key_values, number, percent, wrap

EXAMPLES = """\
examples:
  bnfold inspect digits.pt
  bnfold inspect weights.pt --arch resnet --input-shape 3,32,32
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
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    add_load_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnfold.pipeline import inspect_file

    with status(args.quiet or args.json) as update:
        update(f"loading {args.file}")
        info = inspect_file(args.file, load_options(args))
    out = console()
    if args.json:
        out.print_json(json.dumps(info.to_dict()))
        return 0
    width = out.width
    src = info.source
    rows: list[tuple[str, Any]] = [
        ("kind", src.kind + (f" (opset {info.opset})" if info.opset else "")),
        ("architecture", src.architecture),
        ("input shape", f"(batch, {', '.join(map(str, src.input_shape))})"),
    ]
    if src.feature_names:
        rows.append(("features", f"{len(src.feature_names)}, in input order: {', '.join(src.feature_names)}"))
    labels = ", ".join(src.class_labels[:20]) + (" ..." if len(src.class_labels) > 20 else "")
    if src.class_labels:
        rows.append(("class labels", f"{len(src.class_labels)}: {labels}"))
    else:
        rows.append(("outputs", f"{src.num_outputs} (no class labels recorded)" if src.num_outputs else "unknown"))
    if src.dataset:
        rows.append(("data set", src.dataset))
    rows += [
        ("parameters", f"{info.parameters:,}"),
        ("layers" if src.kind == "checkpoint" else "ops", ", ".join(f"{name} {n}" for name, n in
                                                                    info.layer_counts.items())),
        ("sha256", src.sha256),
    ]
    lines = [*wrap(f"{src.path}:", width), *key_values(rows, width)]
    lines += views.fold_summary(info.fold, width, verbose=True, title="fold plan")
    lines += views.notes([*src.notes, *info.fold.notes], width)
    if info.certificate is not None:
        lines += wrap("certificate:", width) + key_values(_certificate_rows(info), width)
    emit(out, lines)
    return 0


def _certificate_rows(info: Any) -> list[tuple[str, Any]]:
    cert = info.certificate
    rows: list[tuple[str, Any]] = [
        ("bnfold version", cert.bnfold_version),
        ("source sha256", cert.source_sha256),
        ("folded / kept", f"{cert.folded} / {cert.kept}"),
    ]
    if cert.batchnorm_nodes is not None:
        agrees = cert.batchnorm_nodes == info.batchnorm_nodes
        rows.append(("BatchNormalization nodes", (f"{cert.batchnorm_nodes}, as in the file", "") if agrees else
                     (f"{cert.batchnorm_nodes} but the file has {info.batchnorm_nodes}", "red")))
    if cert.opset is not None:
        rows.append(("opset, exporter", f"{cert.opset}, {cert.exporter or 'none (ONNX input)'}"))
    rows.append(("tolerance", f"atol {cert.tolerance.atol:g}, rtol {cert.tolerance.rtol:g}"))
    for key, err in cert.errors.items():
        rows.append((key, f"max abs error {number(err.get('max_abs_error', float('nan')))} (allowed "
                     f"{number(err.get('allowed'))}) on {err.get('n_samples')} samples, top-1 "
                     f"{percent(err.get('top1_agreement'))}"))
    if info.selftest is not None:
        verdict = "reproduces" if info.selftest.passed else "DOES NOT REPRODUCE"
        rows.append(("self-test", (f"{len(cert.selftest_input)} samples, {verdict} in onnxruntime: max abs error "
                                   f"{number(info.selftest.max_abs)} (allowed {number(info.selftest.allowed)})",
                                   "green" if info.selftest.passed else "red")))
    return rows
