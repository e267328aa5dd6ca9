"""``/metrics`` of a real ``python -m service --workers 2`` process covers both workers.

Each uvicorn worker is its own process; without a shared prometheus_client multiprocess directory a
scrape shows only the worker that answered it. The test keeps sending until the shared directory
holds counter files of two worker pids (so both served), then requires every scrape to show the total.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_process import free_port, is_ready, start, stop, wait_until

from service.metrics import MULTIPROC_ENV

pytestmark = pytest.mark.slow
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [0.5, -1.0, 2.0, 0.25] * 2}]}


def _pids(directory: Path, kind: str) -> set[int]:
    """Pids that wrote prometheus_client ``<kind>_<pid>.db`` files into the shared directory."""
    return {int(m.group(1)) for f in directory.iterdir() if (m := re.fullmatch(rf"{kind}_(\d+)\.db", f.name))}


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name}{{{labels}}} in /metrics:\n{text}"
    return float(match.group(1))


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, metrics_dir: Path) -> None:
        self.process, self.url, self.metrics_dir = process, url, metrics_dir


@pytest.fixture
def server(repository: Path, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    tmp = tmp_path / "tmp"  # the service's TMPDIR, so that the test finds the shared metrics directory
    tmp.mkdir()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_WORKERS": "2", "TMPDIR": str(tmp)}
    env.pop(MULTIPROC_ENV, None)
    process = start(env)
    url = f"http://127.0.0.1:{port}"
    try:
        def both_loaded() -> bool:  # both workers have loaded their models: two readiness gauge files
            directories = list(tmp.glob("bnfold-metrics-*"))
            return len(directories) == 1 and len(_pids(directories[0], "gauge_livemin")) == 2

        wait_until(process, both_loaded, "two workers loading their models")
        wait_until(process, lambda: is_ready(url), "readiness")
        yield Server(process, url, next(tmp.glob("bnfold-metrics-*")))
    finally:
        stop(process)


def test_metrics_sum_over_workers(server: Server) -> None:
    def infer(_: int) -> None:  # a new connection per request: the kernel hands it to either worker
        response = httpx.post(f"{server.url}/v2/models/classifier/infer", json=BODY, timeout=30)
        assert response.status_code == 200, response.text

    sent = 0
    deadline = time.monotonic() + 60  # which worker accepts is up to the kernel
    with ThreadPoolExecutor(8) as pool:
        while len(_pids(server.metrics_dir, "counter")) < 2:
            assert time.monotonic() < deadline, f"only workers {_pids(server.metrics_dir, 'counter')} served {sent}"
            list(pool.map(infer, range(16)))
            sent += 16
    workers = _pids(server.metrics_dir, "counter")
    assert len(workers) == 2 and server.process.pid not in workers
    for _ in range(6):  # fresh connections: scrapes land on both workers, each must report the total
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert _sample(text, "bnfold_requests_total", 'model="classifier",outcome="success"') == sent
        assert _sample(text, "bnfold_request_duration_seconds_count", 'model="classifier"') == sent
        assert _sample(text, "bnfold_batch_size_sum", 'model="classifier"') == 2 * sent
        assert _sample(text, "bnfold_model_ready", 'model="classifier",version="2"') == 1
        assert _sample(text, "bnfold_model_ready", 'model="tampered",version="1"') == 0
        assert "pid=" not in text  # livemin and sums: one series per label set, not one per worker


def test_killed_worker_keeps_its_counts_and_loses_its_readiness(server: Server) -> None:
    for _ in range(8):
        assert httpx.post(f"{server.url}/v2/models/classifier/infer", json=BODY, timeout=30).status_code == 200
    victim = min(_pids(server.metrics_dir, "counter"))  # a worker that served some of the 8
    os.kill(victim, signal.SIGKILL)  # no lifespan shutdown: its replacement must drop the stale readiness
    deadline = time.monotonic() + 90  # the replacement imports and loads on a busy machine
    while victim in (live := _pids(server.metrics_dir, "gauge_livemin")) or len(live) < 2:
        assert time.monotonic() < deadline, f"no replacement for worker {victim}: readiness files of {live}"
        time.sleep(0.1)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert _sample(text, "bnfold_requests_total", 'model="classifier",outcome="success"') == 8
    assert _sample(text, "bnfold_model_ready", 'model="classifier",version="1"') == 1


def test_shared_directory_removed_at_exit(server: Server) -> None:
    assert server.metrics_dir.is_dir() and oct(server.metrics_dir.stat().st_mode & 0o777) == "0o700"
    server.process.send_signal(signal.SIGTERM)  # the parent stops its workers, then cleans up
    assert server.process.wait(15) == 0
    assert not server.metrics_dir.exists()
