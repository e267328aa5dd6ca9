"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNKNOWN_MODEL = "(unknown)"  # label for requests naming no served model: bounded label cardinality


class ServiceMetrics:
    """Requests by model and outcome, latency, queue time, batch size, and model readiness."""

    def __init__(self) -> None:
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
                                 ["model", "version"], registry=self.registry)
        # Label children cached per label values: ``.labels()`` costs a lock and a dict lookup per call.
        # Model labels are served names or UNKNOWN_MODEL, statuses are HTTP codes: the caches stay small.
        self._counts: dict[tuple[str, str], Counter] = {}
        self._latencies: dict[str, Histogram] = {}
        self._errors: dict[int, Counter] = {}

    def observer(self, model: str) -> _BatchObserver:
        """A batch observer recording queue time and batch size for ``model``."""
        return _BatchObserver(self, model)

    def request(self, model: str, outcome: str, seconds: float | None = None) -> None:
        """Count one inference request of ``model`` with ``outcome``; ``seconds`` = its latency on success."""
        count = self._counts.get((model, outcome))
        if count is None:
            count = self._counts[(model, outcome)] = self.requests.labels(model, outcome)
        count.inc()
        if seconds is not None:
            latency = self._latencies.get(model)
            if latency is None:
                latency = self._latencies[model] = self.latency.labels(model)
            latency.observe(seconds)

    def http_error(self, status: int) -> None:
        """Count one error response with HTTP ``status``."""
        count = self._errors.get(status)
        if count is None:
            count = self._errors[status] = self.http_errors.labels(str(status))
        count.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BatchObserver:
    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._queue = metrics.queue_time.labels(model)
        self._batch = metrics.batch_size.labels(model)

    def batch(self, rows: int, queue_seconds: list[float]) -> None:
        self._batch.observe(rows)
        for seconds in queue_seconds:
            self._queue.observe(seconds)
