"""Benchmark 2, fold cost: wall time of fold + verify + export, per architecture and against depth.

Each measurement runs :func:`bnfold.pipeline.fold_and_certify` (exactly what ``bnfold fold`` does
between loading and writing: fold, verify in PyTorch against a float64 reference on 64 random and
the validation samples, export to ONNX, verify onnxruntime against PyTorch, attach and re-check
the certificate) and reads its per-step timings; the median of ``repeats`` interleaved rounds is
reported (each round runs every model once), and the fit is repeated on the per-model minimum.

The depth sweep uses bnfold's ``resnet`` with one stage of ``b`` basic blocks at constant width,
so the number of normalization layers is ``n = 2b + 1`` BatchNorm2d plus the InputNorm: 8, 16, 32
and 64 for b = 3, 7, 15, 31. Every layer adds the same work, so the time should be linear in
``n``: we fit ``t = a + b n`` by least squares and report the fit's R^2 and the log-log slope
(1 = linear).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

STEPS = ("fold", "verify", "export", "verify_onnx", "certify")


def time_pipelines(paths: list[Path], repeats: int) -> list[dict[str, Any]]:
    """Per path: median (and minimum) per-step and total seconds of ``fold_and_certify`` over ``repeats``
    rounds; each round runs every path once, so load from other processes hits all paths alike."""
    from bnfold.pipeline import fold_and_certify, load_source

    runs: list[list[dict[str, float]]] = [[] for _ in paths]
    info: list[dict[str, Any]] = [{} for _ in paths]
    for _ in range(repeats):
        for i, path in enumerate(paths):
            source = load_source(path)  # a fresh, unfolded model every time
            outcome = fold_and_certify(source)
            runs[i].append(outcome.timings)
            info[i] = {"folded": outcome.fold.counts.get("folded", 0), "kept": outcome.fold.counts.get("kept", 0),
                       "input_shape": source.input_shape}
    results = []
    for timings, extra in zip(runs, info, strict=True):
        totals = [sum(t.get(s, 0.0) for s in STEPS) for t in timings]
        results.append({"steps_s": {step: statistics.median(t.get(step, 0.0) for t in timings) for step in STEPS},
                        "total_s": statistics.median(totals), "total_min_s": min(totals), **extra})
    return results


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x``, its R^2, and the slope of log y against log x."""
    import numpy as np

    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (intercept + slope * xs)
    total = float(np.sum((ys - ys.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual ** 2)) / total if total > 0 else 1.0
    loglog = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    return {"intercept_s": float(intercept), "slope_s_per_layer": float(slope), "r2": r2, "loglog_slope": loglog}


def run(out: Path, *, mode: str = "full") -> dict[str, Any]:
    """Measure and write ``fold_cost.json`` and ``fold_cost.md`` to ``out``; ``mode`` is full, quick or smoke."""
    import torch

    common.check_mode(mode)
    torch.set_num_threads(1)
    repeats = 5 if mode == "full" else 1
    epochs = 3 if mode == "full" else 1
    archs = ("mlp", "cnn") if mode == "smoke" else ("resnet", "mobilenet", "mlp", "cnn")
    common.log(f"fold cost: {', '.join(archs)}")
    per_arch = [{"model": arch, **row} for arch, row in zip(archs, time_pipelines(
        [common.trained_checkpoint(arch, epochs=epochs) for arch in archs], repeats), strict=True)]
    blocks = {"full": (3, 7, 15, 31), "quick": (3, 7, 15), "smoke": (1, 2, 3)}[mode]
    paths = [common.trained_checkpoint("resnet", epochs=1, depth=1, blocks_per_stage=b) for b in blocks]
    common.log(f"fold cost: resnet with {', '.join(str(2 * b + 2) for b in blocks)} normalization layers")
    depth = [{"blocks": b, "norm_layers": 2 * b + 2, **row}
             for b, row in zip(blocks, time_pipelines(paths, repeats), strict=True)]
    fits = {"total": linear_fit([d["norm_layers"] for d in depth], [d["total_s"] for d in depth]),
            "total (minimum)": linear_fit([d["norm_layers"] for d in depth], [d["total_min_s"] for d in depth])}
    for step in STEPS:
        values = [d["steps_s"][step] for d in depth]
        if min(values) > 0:
            fits[step] = linear_fit([d["norm_layers"] for d in depth], values)
    body = {"benchmark": "fold_cost", "mode": mode, "machine": common.machine(),
            "settings": {"threads": 1, "repeats": repeats}, "architectures": per_arch, "depth": depth, "fits": fits}
    common.write_json(out / "fold_cost.json", body)
    (out / "fold_cost.md").write_text(markdown(body))
    return body


def markdown(body: dict[str, Any]) -> str:
    header = ["model", "BN folded", *[f"{s} s" for s in STEPS], "total s"]
    rows = [[a["model"], a["folded"], *[f"{a['steps_s'][s]:.3f}" for s in STEPS], f"**{a['total_s']:.3f}**"]
            for a in body["architectures"]]
    text = "### Fold + verify + export, per architecture (median seconds)\n\n" + common.markdown_table(header, rows)
    rows = [[f"resnet, {d['blocks']} blocks", d["norm_layers"], *[f"{d['steps_s'][s]:.3f}" for s in STEPS],
             f"**{d['total_s']:.3f}**"] for d in body["depth"]]
    text += "\n### Against depth (normalization layers = BatchNorm2d + InputNorm)\n\n" + common.markdown_table(
        ["model", "norm layers", *header[2:]], rows)
    rows = [[name, f"{f['intercept_s']:.3f}", f"{f['slope_s_per_layer'] * 1e3:.2f}", f"{f['r2']:.4f}",
             f"{f['loglog_slope']:.2f}"] for name, f in body["fits"].items()]
    text += "\n### Linear fit t = a + b n\n\n" + common.markdown_table(
        ["time", "a (s)", "b (ms per layer)", "R^2", "log-log slope"], rows)
    return text


def main(argv: list[str] | None = None) -> int:
    return common.run_script(__doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
