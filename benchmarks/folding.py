"""Benchmark 1, folding speedup: unfolded vs folded latency, session creation, file size and node count.

For each trained checkpoint, in one process with one thread (``torch.set_num_threads(1)``,
onnxruntime ``intra_op_num_threads=1``) so the two variants compete for the same core alike:

* latency at batch 1 and 32 in PyTorch eager and in onnxruntime with graph optimizations
  disabled and with all enabled: medians over interleaved rounds (one call of each variant per
  round, rotating order; :func:`bnfold.latency.interleaved_medians`);
* onnxruntime session creation (from the serialized bytes), median of interleaved creations;
* the ONNX file size and node count: the unfolded baseline is exported with its BatchNormalization
  nodes kept (:func:`bnfold.export.to_onnx`: no export fuses them); the folded one is exactly what
  ``bnfold fold`` writes (certificate and self-test vector included).

Every ratio is unfolded / folded, so > 1 means folding helped.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

RUNTIMES = ("pytorch eager", "onnxruntime (opt off)", "onnxruntime (opt on)")


def models(mode: str) -> list[tuple[str, Path]]:
    """(label, checkpoint) of the benchmarked models: trained briefly with bnfold's own train()."""
    epochs = 3 if mode == "full" else 1
    archs = ("mlp", "cnn") if mode == "smoke" else ("resnet", "mobilenet", "mlp", "cnn")
    found = [(arch, common.trained_checkpoint(arch, epochs=epochs)) for arch in archs]
    if mode == "full":
        found.append(("resnet 3x32x32", common.calibrated_checkpoint("resnet", (3, 32, 32))))
    return found


def session_creation_ms(data: dict[str, bytes], *, optimize: bool, repeats: int) -> dict[str, float]:
    """Median milliseconds to create an onnxruntime session from each model's bytes, interleaved."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    times: dict[str, list[float]] = {name: [] for name in data}
    names = list(data)
    for round_ in range(repeats + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            ort.InferenceSession(data[name], opts, providers=["CPUExecutionProvider"])
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_model(label: str, path: Path, *, batches: tuple[int, ...], repeats: dict[int, int],
                session_repeats: int) -> dict[str, Any]:
    from bnfold import export
    from bnfold.latency import interleaved_medians
    from bnfold.pipeline import fold_and_certify, load_source
    from bnfold.verification import ort_runner, runner

    source = load_source(path)
    outcome = fold_and_certify(source)  # fold + verify + export + certificate, as `bnfold fold` does
    unfolded_onnx = export.to_onnx(source.model, source.input_shape)
    folded_onnx = outcome.onnx_model
    pairs = {"pytorch eager": (runner(source.model), runner(outcome.fold.model))}
    for optimize in (False, True):
        pairs[RUNTIMES[1 + optimize]] = (ort_runner(unfolded_onnx, optimize=optimize, threads=1),
                                         ort_runner(folded_onnx, optimize=optimize, threads=1))
    latency = []
    for batch in batches:
        x = export.random_inputs(source.input_shape, batch, seed=1)
        runners = {f"{rt}|{i}": pair[i] for rt, pair in pairs.items() for i in (0, 1)}
        med = interleaved_medians(runners, x, repeats=repeats[batch], warmup=max(3, repeats[batch] // 10))
        for rt in pairs:
            u, f = med[f"{rt}|0"] * 1e3, med[f"{rt}|1"] * 1e3
            latency.append({"runtime": rt, "batch": batch, "unfolded_ms": u, "folded_ms": f, "ratio": u / f})
    data = {"unfolded": unfolded_onnx.SerializeToString(), "folded": folded_onnx.SerializeToString()}
    sessions = []
    for optimize in (False, True):
        med = session_creation_ms(data, optimize=optimize, repeats=session_repeats)
        sessions.append({"optimize": optimize, "unfolded_ms": med["unfolded"], "folded_ms": med["folded"],
                         "ratio": med["unfolded"] / med["folded"]})
    cert_bytes = sum(len(p.key) + len(p.value) for p in folded_onnx.metadata_props)
    return {
        "model": label,
        "checkpoint": path.name,
        "dataset": source.dataset,
        "val_accuracy": _val_accuracy(path),
        "architecture": source.architecture,
        "input_shape": source.input_shape,
        "batchnorms": outcome.fold.counts,
        "latency": latency,
        "session_creation": sessions,
        "file": {
            "unfolded_bytes": len(data["unfolded"]), "folded_bytes": len(data["folded"]),
            "folded_certificate_bytes": cert_bytes,
            "unfolded_nodes": len(unfolded_onnx.graph.node), "folded_nodes": len(folded_onnx.graph.node),
            "unfolded_ops": export.op_counts(unfolded_onnx), "folded_ops": export.op_counts(folded_onnx),
        },
    }


def _val_accuracy(path: Path) -> float | None:
    """The checkpoint's best validation accuracy as bnfold.train recorded it (None if not trained)."""
    import torch

    metrics = torch.load(path, weights_only=True, map_location="cpu").get("metrics") or {}
    value = metrics.get("best_val_accuracy")
    return float(value) if value is not None else None


def run(out: Path, *, mode: str = "full") -> dict[str, Any]:
    """Measure and write ``folding.json`` and ``folding.md`` to ``out``; ``mode`` is full, quick or smoke."""
    import torch

    common.check_mode(mode)
    torch.set_num_threads(1)
    batches = (1, 32)
    repeats = {1: 300, 32: 60} if mode == "full" else {1: 30, 32: 10}
    results = []
    for label, path in models(mode):
        common.log(f"folding benchmark: {label}")
        results.append(bench_model(label, path, batches=batches, repeats=repeats,
                                   session_repeats=30 if mode == "full" else 3))
    body = {"benchmark": "folding", "mode": mode, "machine": common.machine(),
            "settings": {"threads": 1, "batches": list(batches), "repeats": {str(k): v for k, v in repeats.items()}},
            "results": results}
    common.write_json(out / "folding.json", body)
    (out / "folding.md").write_text(markdown(body))
    return body


def markdown(body: dict[str, Any]) -> str:
    rows = []
    for r in body["results"]:
        for lat in r["latency"]:
            rows.append([r["model"], lat["runtime"], lat["batch"], f"{lat['unfolded_ms']:.3f}",
                         f"{lat['folded_ms']:.3f}", f"**{lat['ratio']:.2f}x**"])
    text = "### Latency, median ms (unfolded / folded)\n\n" + common.markdown_table(
        ["model", "runtime", "batch", "unfolded ms", "folded ms", "ratio"], rows)
    rows = []
    for r in body["results"]:
        acc = r.get("val_accuracy")
        rows.append([r["model"], r.get("dataset") or "synthetic (calibrated BN statistics)",
                     "-" if acc is None else f"{acc:.3f}", r["checkpoint"]])
    text += "\n### Models\n\n" + common.markdown_table(["model", "data set", "validation accuracy", "checkpoint"],
                                                          rows)
    rows = []
    for r in body["results"]:
        s = {s["optimize"]: s for s in r["session_creation"]}
        f = r["file"]
        rows.append([r["model"], *[f"{s[o]['unfolded_ms']:.2f} / {s[o]['folded_ms']:.2f} ({s[o]['ratio']:.2f}x)"
                                   for o in (False, True)],
                     f"{f['unfolded_nodes']} / {f['folded_nodes']}",
                     f"{f['unfolded_bytes'] / 1024:.1f} / {f['folded_bytes'] / 1024:.1f} "
                     f"(cert {f['folded_certificate_bytes'] / 1024:.1f})",
                     f"{r['batchnorms'].get('folded', 0)} / {r['batchnorms'].get('kept', 0)}"])
    text += "\n### Session creation, graph size\n\n" + common.markdown_table(
        ["model", "session ms, opt off", "session ms, opt on", "ONNX nodes", "file kB (certificate kB)",
         "BN folded / kept"], rows)
    return text


def main(argv: list[str] | None = None) -> int:
    return common.run_script(__doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
