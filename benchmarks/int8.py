"""Benchmark: float folded vs int8 (``bnfold fold --quantize int8``), side by side in one run.

For each model, in one process with one onnxruntime thread (both variants compete for the same
core alike), all graph optimizations on (what the server runs):

* the certified float folded model and the int8 model made from it with every layer quantized by
  :mod:`bnfold.quantize` (QDQ, per-channel 7-bit weights, uint8 activations, min/max calibration on
  256 samples): what ``--quantize int8`` writes when the contract holds;
* latency at batch 1 and 32: medians over interleaved rounds (one call of each variant per round,
  rotating order); throughput ratio = float latency / int8 latency, so > 1 means int8 is faster;
* accuracy: top-1 agreement of int8 with float on held-out samples, and both validation accuracies
  for the models trained on digits. The 3x32x32 ResNets have random weights with calibrated
  batch-norm statistics and no data set: they are calibrated on 256 and measured on 512 synthetic
  smooth images (agreement only);
* the CPU's int8 instructions (``/proc/cpuinfo`` flags): VNNI (``avx512_vnni``, ``avx_vnni``) and
  AMX (``amx_int8``) multiply-accumulate int8 in one instruction; without them (AVX2 only)
  onnxruntime uses ``vpmaddubsw`` + ``vpmaddwd``, so the gain is smaller;
* the 1-minute load average before and after, since the machine is shared.

In the full run, serving: one ``bnfold serve`` with version 1 float and version 2 int8 of one
ResNet, requests/s of batch-1 requests at 32 connections (:func:`serving`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp")
BUDGET_S = {"full": 20.0, "quick": 3.0, "smoke": 0.3}  # timing budget per model and batch size


def cpu_int8_support() -> dict[str, bool]:
    """Which int8-relevant instruction set flags ``/proc/cpuinfo`` lists (False where it is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return {flag: flag in flags for flag in dict.fromkeys(INT8_FLAGS)}


REAL = ("torchvision/resnet18", "timm/resnet26d")  # ResNet-style models of the real-architecture set, 3x64x64


def real_models(mode: str) -> list[str]:
    """The real architectures measured: only in the full mode, and only where torchvision and timm import."""
    import importlib.util

    if mode != "full" or any(importlib.util.find_spec(m) is None for m in ("torchvision", "timm")):
        return []
    return list(REAL)


def models(mode: str) -> list[tuple[str, Path, str | None]]:
    """(label, checkpoint, data) per model: data None means synthetic calibration images."""
    epochs = 3 if mode == "full" else 1
    archs = ("cnn",) if mode == "smoke" else ("cnn", "resnet", "mobilenet")
    found: list[tuple[str, Path, str | None]] = [
        (arch, common.trained_checkpoint(arch, epochs=epochs), "digits") for arch in archs]
    if mode != "smoke":
        found.append(("resnet 3x32x32", common.calibrated_checkpoint("resnet", (3, 32, 32)), None))
        found.append(("resnet 3x32x32 width 64", common.calibrated_checkpoint("resnet", (3, 32, 32), width=64), None))
    return found


def synthetic_images(n: int, shape: tuple[int, ...], seed: int) -> Any:
    """Smooth random fields plus noise, as :func:`benchmarks.common.calibrated_checkpoint` calibrated on."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, shape[0], 4, 4, generator=generator)
    x = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    return np.ascontiguousarray((x + 0.1 * torch.randn(x.shape, generator=generator)).numpy(), dtype=np.float32)


def real_source(name: str) -> Any:
    """Real architecture ``name`` (random weights, randomized batch-norm statistics, as in
    :mod:`benchmarks.real_archs`) as a pipeline source."""
    from benchmarks import real_archs
    from bnfold import pipeline

    arch = real_archs.BY_NAME[name]
    return pipeline.Source(Path(name), "", "checkpoint", real_archs.prepared(arch), name, list(arch.input_shape),
                           [], num_outputs=None)


def measured_int8(source: Any, data: str | None) -> dict[str, Any]:
    """Fold and certify ``source`` in float, quantize every layer (what ``--quantize int8`` writes when the
    contract holds) and measure the contract; ``data`` None: synthetic calibration and held-out images."""
    from bnfold import pipeline, quantize
    from bnfold.quantize import Bounds, contract, static
    from bnfold.quantize.calibration import Calibration
    from bnfold.verification import ort_runner, run_batched

    config = pipeline.Config(n_random=8, use_data=data is not None)
    if data is None:
        shape = tuple(source.input_shape)
        calibration = Calibration(x=synthetic_images(256, shape, 1), name="synthetic images",
                                  eval_x=synthetic_images(512, shape, 2), eval_name="synthetic images",
                                  eval_y=None, notes=[])
    else:
        calibration = quantize.calibration_for(source, config, quantize.QuantizeOptions())
    outcome = pipeline.fold_and_certify(source, config)
    model = static.named(outcome.onnx_model)
    int8 = static.quantize(model, calibration.x)
    float_out = run_batched(ort_runner(model), calibration.eval_x)
    measured = contract.measure(float_out, ort_runner(int8, optimize=True), calibration.eval_x, calibration.eval_y,
                                calibration.eval_name)
    return {"float": outcome.onnx_model, "int8": int8, "measured": measured, "layers": len(static.layers(model)),
            "reason": measured.reason(Bounds()), "input_shape": list(source.input_shape)}


def session(data: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _run(session: Any, name: str, x: Any) -> Any:
    return session.run(None, {name: x})


def latency(float_bytes: bytes, int8_bytes: bytes, shape: list[int], batch: int, mode: str) -> dict[str, Any]:
    """Median seconds per call of each variant, interleaved; as many rounds as the mode's budget allows."""
    import time

    import numpy as np

    from bnfold.latency import interleaved_medians

    sessions = {"float": session(float_bytes), "int8": session(int8_bytes)}
    name = sessions["float"].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    runners = {k: functools.partial(_run, s, name) for k, s in sessions.items()}
    start = time.perf_counter()
    for run in runners.values():
        run(x)
    once = time.perf_counter() - start
    repeats = max(3 if mode == "smoke" else 15, min(300, int(BUDGET_S[mode] / max(once, 1e-6))))
    medians = interleaved_medians(runners, x, repeats=repeats, warmup=2)
    return {"batch": batch, "repeats": repeats, "float_ms": medians["float"] * 1e3, "int8_ms": medians["int8"] * 1e3,
            "speedup": medians["float"] / medians["int8"],
            "int8_samples_per_s": batch / medians["int8"], "float_samples_per_s": batch / medians["float"]}


def run(out: Path, mode: str = "full") -> dict[str, Any]:
    common.check_mode(mode)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()[0]
    results = []
    from bnfold import pipeline

    jobs: list[tuple[str, str | None, Any]] = [
        (label, data, functools.partial(pipeline.load_source, path)) for label, path, data in models(mode)]
    jobs += [(name, None, functools.partial(real_source, name)) for name in real_models(mode)]
    for label, data, load in jobs:
        common.log(f"{label}: fold, verify, quantize")
        m = measured_int8(load(), data)
        measured = m["measured"]
        float_bytes, int8_bytes = m["float"].SerializeToString(), m["int8"].SerializeToString()
        rows = []
        for batch in (1, 32):
            common.log(f"{label}: latency at batch {batch}")
            rows.append(latency(float_bytes, int8_bytes, m["input_shape"], batch, mode))
        results.append({
            "model": label, "input_shape": m["input_shape"], "data": data or "synthetic images",
            "agreement": measured.agreement, "agreement_samples": measured.samples,
            "float_accuracy": measured.float_accuracy, "int8_accuracy": measured.int8_accuracy,
            "contract_met": m["reason"] is None, "contract_miss": m["reason"], "layers": m["layers"],
            "float_bytes": len(float_bytes), "int8_bytes": len(int8_bytes), "latency": rows,
        })
    serving_body: dict[str, Any] | None = None
    if mode == "full":
        try:
            serving_body = serving(mode, out)
        except (RuntimeError, OSError, AssertionError) as exc:  # the latency table stands without it: say why
            common.log(f"serving not measured: {exc}")
            serving_body = {"error": " ".join(str(exc).split())[:500]}
    body = {"mode": mode, "machine": common.machine(), "cpu_int8": cpu_int8_support(), "serving": serving_body,
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "method": "every layer int8: minmax calibration, 256 samples, QDQ, per-channel 7-bit weights, "
                      "uint8 activations; onnxruntime all optimizations, 1 thread, medians of interleaved rounds",
            "results": results}
    common.write_json(out / "int8.json", body)
    (out / "int8.md").write_text(markdown(body))
    plot(body, out / "int8.png")
    return body


SERVING_MODEL = "torchvision/resnet18"  # falls back to bnfold's resnet on 3x32x32 without torchvision/timm


def serving(mode: str, out: Path) -> dict[str, Any]:
    """Requests/s of batch-1 binary requests at 32 connections: version 1 float, version 2 its certified int8.

    One ``bnfold serve`` process (dynamic batching, the defaults) pinned to CPU 0 serves both versions;
    the load generator runs on CPU 1; 3 interleaved slices of 3 s per version, median slice reported.
    """
    import tempfile

    import numpy as np

    from benchmarks import loadgen
    from benchmarks import serving as bench_serving
    from bnfold import pipeline, quantize
    from bnfold.quantize.calibration import Calibration

    if real_models(mode):
        label, source = SERVING_MODEL, real_source(SERVING_MODEL)
    else:
        label = "resnet 3x32x32"
        source = pipeline.load_source(common.calibrated_checkpoint("resnet", (3, 32, 32)))
    common.log(f"serving: {label}, float as version 1, int8 as version 2")
    shape = tuple(source.input_shape)
    outcome = pipeline.fold_and_certify(source, pipeline.Config(n_random=8, use_data=False))
    calibration = Calibration(x=synthetic_images(256, shape, 1), name="synthetic images",
                              eval_x=synthetic_images(512, shape, 2), eval_name="synthetic images", eval_y=None,
                              notes=[])
    int8 = quantize.quantize_outcome(outcome, calibration, quantize.QuantizeOptions())
    generator = "wrk" if loadgen.ensure_wrk(install=False) else "asyncio"
    sample = synthetic_images(1, shape, 3)
    raw = sample.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": int8.certificate.input_name, "shape": list(sample.shape),
                                     "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    rps: dict[str, list[float]] = {"1": [], "2": []}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-serving-") as tmp:
        for version, proto in (("1", outcome.onnx_model), ("2", int8.onnx_model)):
            (Path(tmp) / "m" / version).mkdir(parents=True)
            (Path(tmp) / "m" / version / "model.onnx").write_bytes(proto.SerializeToString())
        port = bench_serving.free_port()
        env = {"BNFOLD_MODEL_REPOSITORY": tmp, "BNFOLD_PORT": str(port), "BNFOLD_HOST": "127.0.0.1",
               "BNFOLD_LOG_LEVEL": "warning", "PYTHONPATH": str(common.ROOT)}
        main_venv = common.ROOT / ".venv" / "bin" / "python"  # has the serve extras; the real-arch venv lacks them
        python = str(main_venv) if main_venv.exists() else sys.executable
        with bench_serving.server([python, "-m", "service"], f"http://127.0.0.1:{port}/v2/health/ready",
                                  env=env, log=Path(tmp) / "server.log"):
            for version in rps:  # check both answer before timing
                url = f"http://127.0.0.1:{port}/v2/models/m/versions/{version}/infer"
                answer, answer_headers = bench_serving.post(url, header + raw, headers)
                assert np.all(np.isfinite(bench_serving.decode_output(answer, answer_headers)))
            for round_ in range(3):
                for version in (["1", "2"] if round_ % 2 == 0 else ["2", "1"]):
                    url = f"http://127.0.0.1:{port}/v2/models/m/versions/{version}/infer"
                    load = loadgen.run_load(generator, url, header + raw, headers, concurrency=32, seconds=3.0,
                                            cpus=bench_serving.GENERATOR_CPUS)
                    rps[version].append(load.rps)
                    errors += load.errors
    median = {v: sorted(r)[len(r) // 2] for v, r in rps.items()}
    return {"model": label, "input_shape": list(shape), "generator": generator, "concurrency": 32,
            "float_rps": median["1"], "int8_rps": median["2"], "speedup": median["2"] / median["1"],
            "slices": rps, "errors": errors}


def markdown(body: dict[str, Any]) -> str:
    m = body["machine"]
    flags = ", ".join(f for f, on in body["cpu_int8"].items() if on) or "none"
    missing = ", ".join(f for f, on in body["cpu_int8"].items() if not on) or "none"
    load = body["load_average_1min"]
    head = (f"# Float folded vs int8\n\nOne run of {m['date_utc']}, {m['cpu']}, {m['cores']} cores, onnxruntime "
            f"{m['onnxruntime']}; 1-min load average {load['before']} before, {load['after']} after (shared "
            f"machine). CPU int8 flags present: {flags}; absent: {missing}.\n\n{body['method']}.\n\n")

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2%}"

    rows = []
    for r in body["results"]:
        one, many = r["latency"]
        rows.append([r["model"], f"{one['float_ms']:.3f} / {one['int8_ms']:.3f}", f"**{one['speedup']:.2f}x**",
                     f"{many['float_ms']:.2f} / {many['int8_ms']:.2f}", f"**{many['speedup']:.2f}x**",
                     f"{many['int8_samples_per_s']:.0f}", f"{pct(r['agreement'])} of {r['agreement_samples']}",
                     f"{pct(r['float_accuracy'])} / {pct(r['int8_accuracy'])}",
                     "yes" if r["contract_met"] else "**no**",
                     f"{r['float_bytes'] / 1024:.0f} / {r['int8_bytes'] / 1024:.0f}"])
    table = common.markdown_table(
        ["model", "batch 1 ms (float / int8)", "speedup", "batch 32 ms (float / int8)", "speedup",
         "int8 samples/s (b32)", "top-1 agreement", "accuracy (float / int8)", "contract met", "KiB (float / int8)"],
        rows)
    served = body.get("serving")
    if served and "error" in served:
        table += f"\nServing was not measured: {served['error']}\n"
    elif served:
        table += (f"\nServing {served['model']} {'x'.join(map(str, served['input_shape']))} with `bnfold serve` "
                  f"(one process on CPU 0, dynamic batching), batch-1 binary requests at {served['concurrency']} "
                  f"connections ({served['generator']} on CPU 1), median of 3 interleaved 3 s slices: version 1 "
                  f"float **{served['float_rps']:.0f}** req/s, version 2 int8 **{served['int8_rps']:.0f}** req/s "
                  f"(**{served['speedup']:.2f}x**; {served['errors']} errors).\n")
    return head + table + (
        "\nSpeedup = float latency / int8 latency (throughput ratio), every layer int8. Accuracy is on the digits "
        "validation split; n/a for the models with random weights (the 3x32x32 ResNets and the real "
        "architectures), measured on synthetic images: agreement only. Contract: >= 99% top-1 agreement and "
        "<= 0.5 points accuracy drop; a model that misses it is measured all the same (its speed does not "
        "depend on its weights), but `bnfold fold --quantize int8` would refuse it.\n")


def plot(body: dict[str, Any], path: Path) -> None:
    """Left: int8 throughput ratio per model at batch 1 and 32; right: agreement and accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    results = body["results"]
    names = [r["model"].replace(" width", "\nwidth").replace("/", "/\n").replace(" 3x", "\n3x") for r in results]
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    at = np.arange(len(results))
    for i, batch in enumerate((1, 32)):
        values = [r["latency"][i]["speedup"] for r in results]
        bars = left.bar(at + (i - 0.5) * 0.38, values, 0.38, label=f"batch {batch}")
        left.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=7)
    left.axhline(1.0, color="black", lw=0.8)
    left.axhline(1.5, color="tab:red", lw=0.8, ls="--", label="1.5x goal (batch 32, ResNet-style)")
    left.set_xticks(at, names, fontsize=8)
    left.set_ylabel("float latency / int8 latency (higher = int8 faster)")
    flags = ", ".join(f for f, on in body["cpu_int8"].items() if on) or "no int8 flags"
    m = body["machine"]
    left.set_title(f"int8 speedup, onnxruntime, 1 thread; {m['cpu']} ({flags})\nload avg "
                   f"{body['load_average_1min']['before']}-{body['load_average_1min']['after']}, "
                   f"{m['date_utc'][:16]}", fontsize=9)
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    series = [("agreement", [r["agreement"] for r in results]),
              ("float accuracy", [r["float_accuracy"] for r in results]),
              ("int8 accuracy", [r["int8_accuracy"] for r in results])]
    for i, (label, values) in enumerate(series):
        shown = [np.nan if v is None else 100 * v for v in values]
        right.bar(at + (i - 1) * 0.27, shown, 0.27, label=label)
    right.axhline(99, color="tab:red", lw=0.8, ls="--", label="99% agreement bound")
    low = min([100 * v for _, vs in series for v in vs if v is not None] + [99.0])
    right.set_ylim(max(0.0, low - 2), 100.5)
    right.set_xticks(at, names, fontsize=8)
    right.set_ylabel("%")
    right.set_title("held-out top-1 agreement and accuracy\n(accuracy n/a: synthetic images)", fontsize=9)
    right.legend(fontsize=7, loc="lower left")
    right.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(common.run_script(__doc__, run, markdown))
