"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

With ``--workers N`` every worker is a separate process: :func:`shared_directory` gives them one
prometheus_client multiprocess directory, and ``/metrics`` sums every worker's values from it.

*Deferred counts.* In a single process, the per-request counts and observations (requests, latency,
queue time, batch size, HTTP errors) are kept in plain Python counters (:class:`_PendingCounter`,
:class:`_PendingHistogram`) and added to prometheus_client's values when the metrics are read
(:meth:`ServiceMetrics.flush`, which :meth:`~ServiceMetrics.render` calls). prometheus_client takes
a lock and about ten Python calls per value: ~1.2 us an ``inc`` and 2.5 us an ``observe`` here, three
of them per request (7% of the server's instructions per request, measured with callgrind). The
pending counters are not thread-safe: they are updated and flushed on the event loop's thread only
(the batcher observes its batches there). In multiprocess mode every update goes to prometheus_client
at once, so that another worker's ``/metrics`` sees it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNKNOWN_MODEL = "(unknown)"  # label for requests naming no served model: bounded label cardinality
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it once, when it is first imported
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def multiprocess_dir() -> Path | None:
    """The shared directory if this process's prometheus_client runs in multiprocess mode, else None.

    prometheus_client picks its value store when first imported; the directory counts only if
    :data:`MULTIPROC_ENV` was set by then (a worker spawned by :func:`shared_directory`).
    """
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path and values.ValueClass is not values.MutexValue else None


@contextmanager
def shared_directory() -> Iterator[Path]:
    """A fresh private (0700) directory exported as :data:`MULTIPROC_ENV` for worker processes started inside.

    Workers must be spawned (a new interpreter inheriting ``os.environ``), as uvicorn does, so that
    prometheus_client is imported after the variable is set. The directory and the variable are
    removed on exit: counters start at zero on every start, as in single-process mode.
    """
    previous = os.environ.get(MULTIPROC_ENV)
    path = Path(tempfile.mkdtemp(prefix="bnfold-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def forget_dead_workers(path: Path) -> list[int]:
    """Drop the live-gauge files of workers that died without :meth:`ServiceMetrics.close` (killed, crashed).

    Counters and histograms of dead workers stay: totals never go backwards. Returns the pids dropped.
    """
    dead = sorted({int(m.group(1)) for f in path.iterdir() if (m := _LIVE_GAUGE_FILE.fullmatch(f.name))
                   and not _alive(int(m.group(1)))})
    for pid in dead:
        mark_process_dead(pid, str(path))
    return dead


class ServiceMetrics:
    """Requests by model and outcome, latency, queue time, batch size, and model readiness.

    In multiprocess mode (:func:`multiprocess_dir`) :meth:`render` sums counters and histograms over
    all workers, dead ones included, and reports a model version ready only if every live worker
    serves it (gauge mode ``livemin``): requests reach any worker, so one worker failing to load a
    model fails that share of requests, which ``max`` would hide.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry()
        self.requests = Counter("bnfold_requests", "Inference requests by model and outcome",
                                ["model", "outcome"], registry=self.registry)
        self.latency = Histogram("bnfold_request_duration_seconds", "Inference request latency (body read to response)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("bnfold_queue_duration_seconds", "Time a request waited for its batch to start",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("bnfold_batch_size", "Rows per onnxruntime run",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.http_errors = Counter("bnfold_http_errors", "Error responses by HTTP status (auth, limits, routing too)",
                                   ["status"], registry=self.registry)
        self.model_ready = Gauge("bnfold_model_ready", "1 if the model version serves, else 0",
                                 ["model", "version"], registry=self.registry, multiprocess_mode="livemin")
        # Label children cached per label values: ``.labels()`` costs a lock and a dict lookup per call.
        # Model labels are served names or UNKNOWN_MODEL, statuses are HTTP codes: the caches stay small.
        self._counts: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}
        self._errors: dict[int, Any] = {}
        self._observers: dict[str, _BatchObserver] = {}
        self._pending: list[_PendingCounter | _PendingHistogram] = []  # flushed by flush() (single process)

    def _counter(self, child: Counter) -> Any:
        """What counts for ``child``: itself in multiprocess mode, else a :class:`_PendingCounter` of it."""
        if self.multiprocess_dir is not None:
            return child
        pending = _PendingCounter(child)
        self._pending.append(pending)
        return pending

    def _histogram(self, child: Histogram, buckets: tuple[float, ...]) -> Any:
        """What observes for ``child`` (of ``buckets``): itself in multiprocess mode, else a pending histogram."""
        if self.multiprocess_dir is not None:
            return child
        pending = _PendingHistogram(child, buckets)
        self._pending.append(pending)
        return pending

    def flush(self) -> None:
        """Add the deferred counts and observations to prometheus_client's values (on the event loop's thread)."""
        for pending in self._pending:
            pending.flush()

    def observer(self, model: str) -> _BatchObserver:
        """A batch observer recording queue time and batch size for ``model`` (one per model: every version
        load asks for it again)."""
        found = self._observers.get(model)
        if found is None:
            found = self._observers[model] = _BatchObserver(self, model)
        return found

    def request(self, model: str, outcome: str, seconds: float | None = None) -> None:
        """Count one inference request of ``model`` with ``outcome``; ``seconds`` = its latency on success.
        Call on the event loop's thread."""
        count = self._counts.get((model, outcome))
        if count is None:
            count = self._counts[(model, outcome)] = self._counter(self.requests.labels(model, outcome))
        count.inc()
        if seconds is not None:
            latency = self._latencies.get(model)
            if latency is None:
                latency = self._latencies[model] = self._histogram(self.latency.labels(model), LATENCY_BUCKETS)
            latency.observe(seconds)

    def http_error(self, status: int) -> None:
        """Count one error response with HTTP ``status`` (on the event loop's thread)."""
        count = self._errors.get(status)
        if count is None:
            count = self._errors[status] = self._counter(self.http_errors.labels(str(status)))
        count.inc()

    def render(self) -> bytes:
        """The exposition text: this process's registry, or every worker's values in multiprocess mode."""
        if self.multiprocess_dir is None:
            self.flush()
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)

    def open(self) -> None:
        """On worker start: forget live gauges of workers that died without closing (:func:`forget_dead_workers`)."""
        if self.multiprocess_dir is not None:
            forget_dead_workers(self.multiprocess_dir)

    def close(self) -> None:
        """On worker exit: withdraw this process's live gauges (its readiness) from the shared view."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))


class _BatchObserver:
    """Batch size and queue times of one model's batches (:class:`service.batching.BatchObserver`)."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._queue = metrics._histogram(metrics.queue_time.labels(model), LATENCY_BUCKETS)
        self._batch = metrics._histogram(metrics.batch_size.labels(model), BATCH_BUCKETS)

    def batch(self, rows: int, queue_seconds: list[float]) -> None:
        self._batch.observe(rows)
        queue = self._queue
        for seconds in queue_seconds:
            queue.observe(seconds)


class _PendingCounter:
    """Increments of one prometheus_client counter child not yet added to it (one thread only)."""

    __slots__ = ("child", "count")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def flush(self) -> None:
        count, self.count = self.count, 0
        if count:
            self.child.inc(count)


class _PendingHistogram:
    """Observations of one prometheus_client histogram child not yet added to it (one thread only): a count
    per bucket and their sum. A value ``v`` falls in the first bucket whose upper bound is ``>= v``, as in
    prometheus_client; :meth:`flush` adds the counts to the child's bucket values and the sum to its sum."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram, bounds: tuple[float, ...]) -> None:
        self.child = child
        self.bounds = bounds  # the child's finite upper bounds; the last count is +Inf's
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        if value == value:  # NaN falls in no bucket, as in prometheus_client (it still adds to the sum)
            self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        counts, total = self.counts, self.total
        if not any(counts) and not total:
            return
        self.counts, self.total = [0] * len(counts), 0.0
        # prometheus_client has no public call adding n observations; a histogram child keeps a value per
        # bucket (non-cumulative, +Inf last) and one for the sum (tests/service/test_service_metrics.py checks)
        buckets = self.child._buckets
        for value, count in zip(buckets, counts, strict=True):
            if count:
                value.inc(count)
        self.child._sum.inc(total)
