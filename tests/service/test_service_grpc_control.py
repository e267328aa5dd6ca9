"""Model control under gRPC load, against a real ``python -m service`` process, driven by tritonclient.grpc.

Poll mode: a version published while gRPC clients run goes live with no failed request, and the
answers switch from the old version to the new at one point. Explicit mode: an unload under gRPC
load lets in-flight requests finish (every answer is the model's, or NOT_FOUND once it is gone).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from server_process import free_port, is_ready, start, stop, wait_until
from service_models import certified, gemm_model, gemm_reference

from bnfold.repository import publish

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow
DEADLINE_S = 120.0  # for a change to go live on a loaded 2-core machine
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def _model(seed: int) -> bytes:
    return certified(gemm_model(seed), seed).SerializeToString()


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE_S:.0f} s"
        time.sleep(0.05)


class GrpcLoad:
    """``lanes`` threads, one gRPC channel each, inferring ``m`` (no version) until :meth:`stop`.

    Records ``(sent, answered, version)`` per answer (``version`` None for an error, kept in ``errors``).
    """

    def __init__(self, address: str, lanes: int = 4) -> None:
        self.address = address
        self.answers: list[tuple[int, int, int | None]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._lane, daemon=True) for _ in range(lanes)]
        for thread in self._threads:
            thread.start()

    def _lane(self) -> None:
        client = tritonclient_grpc.InferenceServerClient(self.address)
        inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        while not self._stop.is_set():
            sent = time.monotonic_ns()
            try:
                result = client.infer("m", [inp], client_timeout=60)
            except tritonclient_grpc.InferenceServerException as exc:
                with self._lock:
                    self.answers.append((sent, time.monotonic_ns(), None))
                    self.errors.append(f"{exc.status()} {exc.message()}")
                continue
            version = int(result.get_response().model_version)
            got, want = result.as_numpy("logits").astype(np.float64), gemm_reference(version, X)
            assert np.max(np.abs(got - want)) <= 1e-5 + 1e-4 * np.max(np.abs(want)), (version, got, want)
            with self._lock:
                self.answers.append((sent, time.monotonic_ns(), version))
        client.close()

    def count(self, version: int) -> int:
        with self._lock:
            return sum(a[2] == version for a in self.answers)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A server in ``request.param`` control mode over ``m`` version 1; yields its gRPC address."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(_model(1))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(tmp_path), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1",
           "BNFOLD_MODEL_CONTROL": str(request.param), "BNFOLD_REPOSITORY_POLL_S": "0.2"}
    process = start(env)
    try:
        wait_until(process, lambda: is_ready(f"http://127.0.0.1:{http_port}"), "readiness")
        yield f"127.0.0.1:{grpc_port}"
    finally:
        stop(process)


@pytest.mark.parametrize("server", ["poll"], indirect=True)
def test_poll_new_version_goes_live_under_grpc_load(server: str, tmp_path: Path) -> None:
    load = GrpcLoad(server)
    try:
        _until(lambda: load.count(1) >= 20, "answers from version 1")
        publish(tmp_path, "m", _model(2))  # as bnfold fold --repository does
        _until(lambda: load.count(2) >= 50, "answers from version 2")
    finally:
        load.stop()
    assert load.errors == []
    old = [a for a in load.answers if a[2] == 1]
    new = [a for a in load.answers if a[2] == 2]
    assert len(old) + len(new) == len(load.answers)
    assert max(a[0] for a in old) < min(a[1] for a in new)  # no request sent after a v2 answer got v1


@pytest.mark.parametrize("server", ["explicit"], indirect=True)
def test_unload_under_grpc_load_lets_in_flight_requests_finish(server: str) -> None:
    triton = tritonclient_grpc.InferenceServerClient(server)
    load = GrpcLoad(server)
    try:
        _until(lambda: load.count(1) >= 20, "answers from version 1")
        triton.unload_model("m")
        _until(lambda: len(load.errors) >= 20, "answers after the unload")
        triton.load_model("m")
        served = load.count(1)
        _until(lambda: load.count(1) >= served + 20, "answers after the load")
    finally:
        load.stop()
        triton.close()
    assert load.errors and all(e.startswith("StatusCode.NOT_FOUND unknown model 'm'") for e in load.errors), \
        sorted(set(load.errors))[:5]
