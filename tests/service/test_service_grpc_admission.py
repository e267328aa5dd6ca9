"""gRPC admission, in process: the request deadline, overload, and how the port is bound.

The app runs in FastAPI's TestClient (its lifespan starts the gRPC server on the TestClient's event
loop, on a free port); tritonclient.grpc calls it from the test thread. A version's batcher is
swapped for a stand-in that blocks or refuses, so the outcomes do not depend on timing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from server_process import free_port, log_text, start, stop, wait_until

from service.config import Settings
from service.errors import Overloaded
from service.main import create_app

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402


@pytest.fixture
def app_client(repository: Path) -> Iterator[tuple[TestClient, str]]:
    port = free_port()
    settings = Settings(model_repository=repository, intra_op_threads=1, grpc_port=port, request_timeout_s=0.5)
    with TestClient(create_app(settings)) as client:
        yield client, f"127.0.0.1:{port}"


def _request() -> pb.ModelInferRequest:
    x = np.zeros((1, 4), np.float32)
    request = pb.ModelInferRequest(model_name="classifier", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    return request


def _refused(address: str) -> Any:
    """The error of one ModelInfer call that must fail."""
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=120)
    return caught.value


class _Batcher:
    """Stands in for a version's batcher: ``enqueue`` raises ``error``, or keeps the request unanswered
    (in :attr:`waiting`) until the test answers it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.waiting: list[Any] = []

    def enqueue(self, feeds: dict[str, np.ndarray], done: Any) -> None:
        if self.error is not None:
            raise self.error
        self.waiting.append(done)

    def close(self) -> None:
        pass


def _swap(client: TestClient, batcher: Any) -> Any:
    entry = client.app.state.service.repository.get("classifier", "2")  # type: ignore[attr-defined]
    original, entry.batcher = entry.batcher, batcher
    return entry, original


def test_deadline_exceeded(app_client: tuple[TestClient, str]) -> None:
    client, address = app_client
    batcher = _Batcher()
    entry, original = _swap(client, batcher)
    try:
        error = _refused(address)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == "the request did not finish within 0.5 s (BNFOLD_REQUEST_TIMEOUT_S)"
        assert entry.inflight == 1  # the batch still holds the request: the version is not freed under it
        late = batcher.waiting.pop()
        client.portal.call(late, RuntimeError("the batch answers after the deadline"))  # type: ignore[union-attr]
        assert entry.inflight == 0  # then the lease is given back, and the late answer goes nowhere
    finally:
        entry.batcher = original


def test_overload_is_unavailable_with_retry_after(app_client: tuple[TestClient, str]) -> None:
    client, address = app_client
    entry, original = _swap(client, _Batcher(Overloaded("model 'classifier' has 256 requests queued")))
    try:
        error = _refused(address)
    finally:
        entry.batcher = original
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "model 'classifier' has 256 requests queued"
    assert ("retry-after", "1") in tuple(error.trailing_metadata())
    metrics = client.get("/metrics").text
    assert 'bnfold_requests_total{model="classifier",outcome="unavailable"} 1.0' in metrics
    assert 'bnfold_grpc_errors_total{code="UNAVAILABLE"} 1.0' in metrics


def test_a_bug_is_internal_without_its_text(app_client: tuple[TestClient, str]) -> None:
    client, address = app_client
    entry, original = _swap(client, _Batcher(RuntimeError("/srv/secret/path.py broke")))
    try:
        error = _refused(address)
    finally:
        entry.batcher = original
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "internal server error")


def test_budget_is_shared_with_http(app_client: tuple[TestClient, str]) -> None:
    """A gRPC request takes its share of BNFOLD_MAX_INFLIGHT_BYTES from the HTTP side's one budget."""
    client, address = app_client
    budget = client.app.endpoints.budget  # type: ignore[attr-defined]
    budget.used = budget.limit  # as if HTTP requests held all of it
    try:
        error = _refused(address)
    finally:
        budget.used = 0
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "over BNFOLD_MAX_INFLIGHT_BYTES" in error.details()


def test_a_port_in_use_is_a_start_up_error(repository: Path) -> None:
    """One worker binds its gRPC port exclusively: a port another server holds (even with SO_REUSEPORT)
    fails the start instead of sharing connections with it."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = Settings(model_repository=repository, intra_op_threads=1, grpc_port=port)
        app = create_app(settings)
        with pytest.raises(RuntimeError, match=f"cannot serve gRPC on 127.0.0.1:{port} \\(BNFOLD_GRPC_PORT\\)"), \
                TestClient(app):
            pass


@pytest.mark.slow
def test_workers_share_the_port(repository: Path) -> None:
    """With BNFOLD_WORKERS=2 both workers bind the gRPC port (SO_REUSEPORT) and answer."""
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1",
           "BNFOLD_WORKERS": "2"}
    process = start(env)
    try:
        wait_until(process, lambda: log_text(process).count('"event": "grpc started"') == 2, "two gRPC workers")
        for _ in range(6):  # fresh connections, spread over the workers by the kernel
            triton = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            wait_until(process, triton.is_server_ready, "gRPC readiness")
            inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
            assert triton.infer("classifier", [inp]).as_numpy("logits").shape == (1, 3)
            triton.close()
        log = log_text(process)
    finally:
        stop(process)
    assert "cannot serve gRPC" not in log and "Traceback" not in log
