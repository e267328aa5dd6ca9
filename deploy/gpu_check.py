"""The CUDA paths end to end, on a machine with a GPU: train, fold, serve on the GPU, compare with the CPU.

    python deploy/gpu_check.py [--out DIR] [--epochs N]

Needs torch with CUDA, and onnxruntime-gpu in place of onnxruntime (the ``CUDAExecutionProvider``).
Steps, each through the real command line or the real service, in a fresh directory:

1. ``bnfold train --device cuda`` and ``bnfold train --device cuda --amp``; with two or more GPUs also
   ``bnfold train --nproc 2 --device cuda`` (nccl, ``torch.nn.SyncBatchNorm``).
2. ``bnfold fold`` of each checkpoint into a model repository (verified against float64 on the CPU).
3. The service in-process with ``BNFOLD_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider``: every
   model must be ready (its certificate self-test passed on the GPU), its session must have started
   the CUDA provider, and the answers for the digits validation split, sent over the v2 API, must
   match an onnxruntime CPU session of the same file (graph optimizations off, the reference) within
   ``1e-5 + 1e-4 x max|CPU output|`` with the same top-1 class for every sample.

Prints one table row per model and writes ``gpu_check.json`` into ``--out``; exit code 0 when every
check passed, 1 when one failed, 2 when the machine lacks what the check needs (said in one line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ATOL, RTOL = 1e-5, 1e-4  # float32: the certificate's default tolerance, relative to the output scale
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TRAIN = ["--epochs", "{epochs}", "--width", "16", "--depth", "2", "--quiet"]


@dataclass
class Row:
    model: str  # the repository name
    trained: str  # how: "cuda", "cuda+amp", "2 x cuda"
    providers: str  # the session's started providers
    selftest: str  # "passed 1.2e-06 <= 5e-04" or the reason it is not ready
    samples: int
    max_abs: float  # |GPU served - CPU reference|
    allowed: float
    top1: float  # fraction of samples with the same class
    passed: bool


def missing_requirements(cuda_available: bool, providers: list[str]) -> str | None:
    """Why this machine cannot run the check, or ``None``."""
    if not cuda_available:
        return "needs a CUDA GPU: torch.cuda.is_available() is False (a CPU-only torch build, or no driver)"
    if CUDA not in providers:
        return (f"needs onnxruntime's {CUDA} (available: {', '.join(providers)}); install onnxruntime-gpu in place "
                "of onnxruntime")
    return None


def runs(gpus: int) -> list[tuple[str, str, list[str]]]:
    """(repository name, description, ``bnfold train`` options) of every training run for ``gpus`` GPUs."""
    plan = [("cuda", "cuda", ["--device", "cuda"]), ("amp", "cuda+amp", ["--device", "cuda", "--amp"])]
    if gpus >= 2:
        plan.append(("ddp", "2 x cuda", ["--device", "cuda", "--nproc", "2", "--batch-size", "64"]))
    return plan


def compare(served: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, allowed error, top-1 agreement) of ``served`` against ``reference``."""
    if served.shape != reference.shape:
        raise ValueError(f"served output has shape {served.shape}, the CPU reference {reference.shape}")
    max_abs = float(np.abs(served.astype(np.float64) - reference.astype(np.float64)).max())
    allowed = ATOL + RTOL * float(np.abs(reference).max())
    top1 = float((served.argmax(1) == reference.argmax(1)).mean())
    return max_abs, allowed, top1


def passes(max_abs: float, allowed: float, top1: float) -> bool:
    return max_abs <= allowed and top1 == 1.0


def _bnfold(*args: str, cwd: Path) -> None:
    command = [sys.executable, "-m", "bnfold", *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "100"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited with {proc.returncode}: {proc.stderr.strip()[-800:]}")


def _cpu_reference(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), sess_options=options, providers=[CPU])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def serve_and_compare(repository: Path, names: list[tuple[str, str]], x: np.ndarray,
                      providers: tuple[str, ...] = (CUDA, CPU)) -> list[Row]:
    """Serve ``repository`` with ``providers`` (the GPU first) and compare every model's answers for ``x``
    with the CPU reference; a row passes only if the session started ``providers[0]``."""
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    settings = Settings(model_repository=repository, intra_op_threads=1, providers=",".join(providers))
    rows = []
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        for name, trained in names:
            entry = app.state.service.repository.get(name)  # service.repository.ModelVersion
            started = ",".join(entry.runtime.providers) if entry.runtime is not None else "not loaded"
            test = entry.selftest
            selftest = (f"self-test {'passed' if test.passed else 'FAILED'}: {test.max_abs:.3g} <= {test.allowed:.3g}"
                        if test is not None else "no self-test")
            if not entry.ready or entry.runtime is None:
                rows.append(Row(name, trained, started, f"not ready: {entry.reason}", 0, float("nan"),
                                float("nan"), 0.0, False))
                continue
            meta = client.get(f"/v2/models/{name}").json()
            body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            response = client.post(f"/v2/models/{name}/infer", json=body)
            if response.status_code != 200:
                rows.append(Row(name, trained, started, f"infer: HTTP {response.status_code} {response.text[:80]}",
                                0, float("nan"), float("nan"), 0.0, False))
                continue
            output = response.json()["outputs"][0]
            served = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
            reference = _cpu_reference(entry.path, x)
            max_abs, allowed, top1 = compare(served, reference)
            on_gpu = entry.runtime.providers[:1] == providers[:1]
            rows.append(Row(name, trained, started, selftest, len(x), max_abs, allowed, top1,
                            on_gpu and test is not None and test.passed and passes(max_abs, allowed, top1)))
    return rows


def table(rows: list[Row]) -> str:
    """The results, one line per model (at most 80 columns) and its self-test below it."""
    lines = [f"{'model':<6} {'trained':<9} {'providers':<10} {'n':>4} {'max|gpu-cpu|':>12} {'allowed':>9} "
             f"{'top-1':>6} result"]
    for r in rows:
        short = r.providers.replace("ExecutionProvider", "")
        lines.append(f"{r.model:<6} {r.trained:<9} {short[:10]:<10} {r.samples:>4} {r.max_abs:>12.3g} "
                     f"{r.allowed:>9.3g} {r.top1:>6.1%} {'pass' if r.passed else 'FAIL'}")
        lines.append(f"  {r.selftest}"[:80])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for the checkpoints, models and gpu_check.json "
                        "(default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training run")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    problem = missing_requirements(torch.cuda.is_available(), list(ort.get_available_providers()))
    if problem is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check."))
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} GPU(s) ({torch.cuda.get_device_name(0)}), torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; working in {out}")
    names = []
    for name, trained, options in runs(gpus):
        extra = [o.format(epochs=args.epochs) for o in TRAIN]
        started = time.perf_counter()
        _bnfold("train", *options, *extra, "-o", f"{name}.pt", cwd=out)
        _bnfold("fold", f"{name}.pt", "--repository", "models", "--name", name, "--quiet", cwd=out)
        print(f"  trained and folded {name} ({trained}) in {time.perf_counter() - started:.1f} s")
        names.append((name, trained))

    from bnfold.data import load_dataset

    data = load_dataset("digits", seed=0)
    x = np.ascontiguousarray(data.X_val, dtype=np.float32)
    rows = serve_and_compare(out / "models", names, x)
    print(table(rows))
    (out / "gpu_check.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "gpus": gpus,
                                                    "torch": str(torch.__version__), "onnxruntime": ort.__version__},
                                                   indent=2) + "\n")
    return 0 if rows and all(r.passed for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
