"""What every benchmark shares: paths, the machine description, cached trained checkpoints, JSON/markdown output.

Checkpoints are trained with bnfold's own :func:`bnfold.train.train` (a few epochs on the bundled
data sets) and cached under ``benchmarks/.cache`` keyed by their configuration, so a re-run only
measures. The serving model on 3x32x32 inputs has no bundled data set: it is bnfold's ``resnet``
with random weights whose batch-norm running statistics are *calibrated* (forward passes in
training mode over synthetic images), i.e. realistic, non-trivial mean/var, and random affine
parameters, so that folding changes every weight.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count, load average and library versions, recorded with every result file."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__.split("+")[0]
    except ImportError:
        pass
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, check=True).stdout.strip()
    return info


MODES = ("full", "quick", "smoke")  # full: the published numbers; quick: a few minutes; smoke: CI, seconds


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def add_mode_options(parser: argparse.ArgumentParser) -> None:
    """``--quick`` / ``--smoke`` and ``--out`` (results directory), shared by every benchmark script."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick", default="full",
                       help="fewer repeats and points, 1-epoch models (a few minutes)")
    group.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                       help="the smallest run that exercises everything (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: benchmarks/results, or results-quick for --quick/--smoke)")


def run_script(doc: str | None, run: Callable[..., dict[str, Any]], markdown: Callable[[dict[str, Any]], str],
               argv: list[str] | None = None) -> int:
    """The command line of a benchmark script: mode options, run into the results directory, print the table."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    add_mode_options(parser)
    args = parser.parse_args(argv)
    print(markdown(run(out_dir(args.out, args.mode), mode=args.mode)))
    return 0


def out_dir(out: Path | None, mode: str) -> Path:
    return out if out is not None else (RESULTS if mode == "full" else BENCH / "results-quick")


def write_json(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _busy_and_total(cpus: set[int]) -> tuple[int, int]:
    """Busy and total jiffies of ``cpus`` so far (Linux ``/proc/stat``; (0, 0) elsewhere)."""
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            busy += sum(values[:8]) - idle
            total += sum(values[:8])
    return busy, total


def wait_quiet(cpus: set[int], *, busy_below: float = 0.1, window_s: float = 1.0, max_s: float = 30.0) -> float:
    """Wait until ``cpus`` are busy less than ``busy_below`` of a ``window_s`` window (what a run before left
    running, e.g. servers still shutting down, would skew the next measurement), at most ``max_s``; returns
    the last window's busy share (0 when it cannot be read)."""
    deadline = time.monotonic() + max_s
    share = 0.0
    while True:
        busy0, total0 = _busy_and_total(cpus)
        time.sleep(window_s)
        busy1, total1 = _busy_and_total(cpus)
        share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if share < busy_below or time.monotonic() > deadline:
            return share


def _key(**config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def trained_checkpoint(arch: str, *, epochs: int, cache: Path = CACHE, **arch_config: Any) -> Path:
    """A bnfold checkpoint of ``arch`` trained for ``epochs`` on its reference data set (cached)."""
    from bnfold.train import TrainConfig, train

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{arch}-{_key(arch=arch, epochs=epochs, **arch_config)}.pt"
    if not path.exists():
        log(f"training {arch} {arch_config or ''} for {epochs} epochs -> {path.name}")
        train(TrainConfig(arch=arch, epochs=epochs, seed=0, device="cpu", arch_config=dict(arch_config)), output=path)
    return path


def calibrated_checkpoint(arch: str, input_shape: tuple[int, ...], *, num_classes: int = 10, seed: int = 0,
                          cache: Path = CACHE, **arch_config: Any) -> Path:
    """A checkpoint of ``arch`` with random weights and calibrated batch-norm statistics (cached).

    Running mean/var come from 20 training-mode forward passes (momentum None: cumulative average)
    over synthetic images (smooth random fields plus noise); BN weight/bias are drawn from
    U(0.5, 1.5) and N(0, 0.1) so that every fold changes the neighbouring weights.
    """
    import torch
    from torch import nn

    from bnfold.archs import build_model
    from bnfold.checkpoint import save_checkpoint

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{arch}-calibrated-{_key(arch=arch, shape=input_shape, seed=seed, **arch_config)}.pt"
    if path.exists():
        return path
    log(f"building {arch} {input_shape} with calibrated batch-norm statistics -> {path.name}")
    torch.manual_seed(seed)
    model = build_model(arch, input_shape=input_shape, num_classes=num_classes, **arch_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
        model.train()
        for _ in range(20):
            coarse = torch.randn(32, input_shape[0], 4, 4, generator=generator)
            x = nn.functional.interpolate(coarse, size=input_shape[1:], mode="bilinear", align_corners=False)
            model(x + 0.1 * torch.randn(x.shape, generator=generator))
    model.eval()
    save_checkpoint(path, model, arch=arch, arch_config={**arch_config, "norm": "bn"}, input_shape=input_shape,
                    class_labels=[str(i) for i in range(num_classes)], seed=seed)
    return path


def pin(cpus: set[int]) -> set[int]:
    """Pin this process to ``cpus`` (intersected with what is allowed); returns the CPUs it now runs on."""
    allowed = os.sched_getaffinity(0)
    target = (cpus & allowed) or allowed
    os.sched_setaffinity(0, target)
    return target


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by ``root`` and its live descendants (Linux ``/proc``).

    CPU time, unlike latency, barely moves when other processes compete for the core, so CPU
    milliseconds per request is the noise-robust measure of a server's efficiency.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid ... utime(11) stime(12)
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid in used:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += used[pid]
    return total / ticks
