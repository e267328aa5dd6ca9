"""``bnfold bench``: the latency table (numbers are not asserted: performance claims live in benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_prints_every_runtime_and_batch(trained: dict[str, Path], run_bnfold) -> None:
    proc = run_bnfold("bench", trained["mlp"], "--repeats", "3", "--warmup", "1", "--batch", "1", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    for runtime in ("pytorch eager", "onnxruntime (opt off)", "onnxruntime (opt on)"):
        assert proc.stdout.count(runtime) == 2  # one row per batch size


def test_bench_rejects_bad_counts(run_bnfold, tmp_path: Path) -> None:
    proc = run_bnfold("bench", tmp_path / "x.pt", "--repeats", "0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("bnfold: error: --repeats")
