"""service.metrics: deferred counts, and the multiprocess plumbing (cross-worker sums: test_service_workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    MULTIPROC_ENV,
    ServiceMetrics,
    forget_dead_workers,
    multiprocess_dir,
    shared_directory,
)

# Every bucket's edge, either side of it, and past the last: where prometheus_client puts each value.
_VALUES = [v for b in LATENCY_BUCKETS for v in (b, b * 0.999, b * 1.001)] + [0.0, 7.5, 1e9]


def _samples(text: str, prefix: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_deferred_counts_expose_what_prometheus_client_would() -> None:
    """The same observations through ServiceMetrics (deferred, flushed on render) and straight into
    prometheus_client give the same samples: buckets, sums and counts. This also pins the prometheus_client
    internals the flush writes (a histogram child's per-bucket values and its sum)."""
    metrics = ServiceMetrics()
    observer = metrics.observer("m")
    registry = CollectorRegistry()
    requests = Counter("bnfold_requests", "x", ["model", "outcome"], registry=registry)
    latency = Histogram("bnfold_request_duration_seconds", "x", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    queue = Histogram("bnfold_queue_duration_seconds", "x", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    batch = Histogram("bnfold_batch_size", "x", ["model"], buckets=BATCH_BUCKETS, registry=registry)
    errors = Counter("bnfold_http_errors", "x", ["status"], registry=registry)
    for round_ in range(2):  # a second flush adds to the first
        for value in _VALUES:
            metrics.request("m", "success", value)
            latency.labels("m").observe(value)
            requests.labels("m", "success").inc()
        metrics.request("m", "invalid_input")
        requests.labels("m", "invalid_input").inc()
        metrics.http_error(400)
        errors.labels("400").inc()
        for rows in (1, 2, 3, 32, 33, 512, 513):
            observer.batch(rows, _VALUES[:rows])
            batch.labels("m").observe(rows)
            for value in _VALUES[:rows]:
                queue.labels("m").observe(value)
        ours, theirs = metrics.render().decode(), generate_latest(registry).decode()
        for prefix in ("bnfold_requests", "bnfold_request_duration", "bnfold_queue", "bnfold_batch", "bnfold_http"):
            mine, reference = _samples(ours, prefix), _samples(theirs, prefix)
            assert mine.keys() == reference.keys(), (round_, prefix)
            for name, value in reference.items():  # counts exactly; a sum added in another order may round apart
                assert mine[name] == (pytest.approx(value, rel=1e-12) if "_sum" in name else value), (round_, name)
    assert f'bnfold_request_duration_seconds_count{{model="m"}} {2.0 * len(_VALUES)}' in ours


def test_deferred_counts_are_read_only_after_a_flush() -> None:
    metrics = ServiceMetrics()
    metrics.request("m", "success", 0.01)
    assert metrics.registry.get_sample_value("bnfold_requests_total", {"model": "m", "outcome": "success"}) == 0.0
    metrics.flush()
    metrics.flush()  # nothing pending: nothing added twice
    assert metrics.registry.get_sample_value("bnfold_requests_total", {"model": "m", "outcome": "success"}) == 1.0
    assert metrics.registry.get_sample_value("bnfold_request_duration_seconds_sum", {"model": "m"}) == 0.01


@pytest.mark.parametrize("previous", [pytest.param(None, id="unset"), pytest.param("/elsewhere", id="set")])
def test_shared_directory_exports_a_private_dir_and_restores(monkeypatch: pytest.MonkeyPatch,
                                                             previous: str | None) -> None:
    if previous is None:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    else:
        monkeypatch.setenv(MULTIPROC_ENV, previous)
    with shared_directory() as path:
        assert os.environ[MULTIPROC_ENV] == str(path)
        assert list(path.iterdir()) == [] and path.stat().st_mode & 0o777 == 0o700
        (path / "counter_1.db").write_bytes(b"x")
    assert os.environ.get(MULTIPROC_ENV) == previous
    assert not path.exists()


def test_variable_set_after_import_keeps_single_process_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """prometheus_client chose its in-memory store at import: reading the directory would show nothing."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    assert multiprocess_dir() is None
    metrics = ServiceMetrics()
    metrics.request("m", "success", 0.01)
    metrics.close()
    assert 'bnfold_requests_total{model="m",outcome="success"} 1.0' in metrics.render().decode()
    assert list(tmp_path.iterdir()) == []


def test_forget_dead_workers_drops_only_live_gauges_of_dead_pids(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True, text=True)
    dead_pid, own_pid = int(dead.stdout), os.getpid()
    names = [f"gauge_livemin_{dead_pid}.db", f"gauge_livemin_{own_pid}.db", f"counter_{dead_pid}.db",
             f"histogram_{dead_pid}.db", f"gauge_max_{dead_pid}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(tmp_path) == [dead_pid]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names[1:])
