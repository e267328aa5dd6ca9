"""Latency of the unfolded vs the folded model, per runtime and batch size (``bnfold bench``).

Runtimes: PyTorch eager (checkpoints only), onnxruntime with graph optimizations off (the
graph as exported) and on (ORT's own fusions; these may fold Conv+BN by themselves, which is
why both are shown). Each measurement is the median of ``repeats`` timed calls; the variants are
*interleaved* (one call of each per round, in rotating order) so that load from other processes
and thermal drift affect all of them alike. Medians, not means: a stray slow call does not move them.
Every runtime gets the same number of threads (default 1): the same compute budget for every
variant, and on a busy machine multi-threaded PyTorch eager slows down by an order of magnitude
(measured: 57 ms vs 1.6 ms per call for the digits CNN at load 8 on 2 cores).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import export
from bnfold.pipeline import LoadOptions, Source, fold_source, load_source
from bnfold.verification import Runner, ort_runner, runner


@dataclass(frozen=True)
class Latency:
    runtime: str  # "pytorch eager", "onnxruntime (opt off)", "onnxruntime (opt on)"
    batch: int
    unfolded_ms: float  # median milliseconds per call
    folded_ms: float

    @property
    def speedup(self) -> float:
        return self.unfolded_ms / self.folded_ms if self.folded_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def interleaved_medians(runners: dict[str, Runner], x: np.ndarray, *, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner on ``x``, timing one call of each per round."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name](x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass(frozen=True)
class Bench:
    """The latencies, and how many batch norms the fold folded and kept (0 folded: nothing changed)."""

    rows: list[Latency]
    folded: int
    kept: int


def bench_file(path: str | Path, options: LoadOptions | None = None, *, batches: Sequence[int] = (1, 32),
               repeats: int = 50, warmup: int = 5, seed: int = 0, threads: int = 1) -> list[Latency]:
    """Load ``path`` (checkpoint or ONNX), fold it, and time unfolded vs folded per runtime and batch."""
    return bench(path, options, batches=batches, repeats=repeats, warmup=warmup, seed=seed, threads=threads).rows


def bench(path: str | Path, options: LoadOptions | None = None, *, batches: Sequence[int] = (1, 32),
          repeats: int = 50, warmup: int = 5, seed: int = 0, threads: int = 1) -> Bench:
    """:func:`bench_file`, also saying how many batch norms were folded."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    source = load_source(path, options)
    if source.kind == "checkpoint":
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _bench(source, batches, repeats, warmup, seed, threads)
        finally:
            torch.set_num_threads(previous)
    return _bench(source, batches, repeats, warmup, seed, threads)


def _bench(source: Source, batches: Sequence[int], repeats: int, warmup: int, seed: int,
           threads: int) -> Bench:
    fold = fold_source(source, export.random_inputs(source.input_shape, 2, seed=seed))
    folded = fold.model
    pairs: dict[str, tuple[Runner, Runner]] = {}
    if source.kind == "checkpoint":
        pairs["pytorch eager"] = (runner(source.model), runner(folded))
        unfolded_onnx = export.to_onnx(source.model, source.input_shape)
        folded_onnx = export.to_onnx(folded, source.input_shape)
    else:
        unfolded_onnx, folded_onnx = source.model, folded
    for optimize in (False, True):
        label = f"onnxruntime (opt {'on' if optimize else 'off'})"
        pairs[label] = (ort_runner(unfolded_onnx, optimize=optimize, threads=threads),
                        ort_runner(folded_onnx, optimize=optimize, threads=threads))
    rows = []
    for batch in batches:
        if batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch}")
        x = export.random_inputs(source.input_shape, batch, seed=seed)
        runners = {f"{label}|{i}": pair[i] for label, pair in pairs.items() for i in (0, 1)}
        medians = interleaved_medians(runners, x, repeats=repeats, warmup=warmup)
        for label in pairs:
            rows.append(Latency(label, batch, medians[f"{label}|0"] * 1e3, medians[f"{label}|1"] * 1e3))
    return Bench(rows, fold.counts["folded"], fold.counts["kept"])
