"""The repository extension over gRPC: tritonclient.grpc's index, load and unload against a real server
with ``BNFOLD_MODEL_CONTROL=explicit``; the answers are the HTTP routes' (same states, same messages)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from server_process import free_port, is_ready, log_text, start, stop, wait_until
from service_models import certified, gemm_model

from service.runtime import ModelRuntime

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repository_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grpc_control")
    for name, version, seed in (("classifier", 1, 1), ("classifier", 2, 2), ("other", 1, 3)):
        path = root / name / str(version) / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(certified(gemm_model(seed), seed).SerializeToString())
    return root


@pytest.fixture(scope="module")
def server(repository_dir: Path) -> Iterator[tuple[str, str]]:
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository_dir), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1",
           "BNFOLD_MODEL_CONTROL": "explicit"}
    process = start(env)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_until(process, lambda: is_ready(url), "readiness")
        triton = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        wait_until(process, triton.is_server_ready, "gRPC readiness")
        triton.close()
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        log = log_text(process)
        stop(process)
    assert "Traceback" not in log


@pytest.fixture
def client(server: tuple[str, str]) -> Iterator[Any]:
    triton = tritonclient_grpc.InferenceServerClient(server[1])
    yield triton
    triton.close()


def _index(client: Any, server: tuple[str, str], ready: bool = False) -> list[dict[str, str]]:
    """The gRPC index as HTTP's JSON rows, after checking that HTTP answers the same."""
    rows = [{"name": m.name, **({"version": m.version} if m.version else {}), "state": m.state,
             **({"reason": m.reason} if m.reason else {})}
            for m in client.get_model_repository_index().models if not ready or m.state == "READY"]
    http = httpx.post(f"{server[0]}/v2/repository/index", json={"ready": ready}, timeout=30).json()
    assert rows == http
    return rows


def _infer(client: Any, x: np.ndarray, model: str = "classifier") -> np.ndarray:
    inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("logits")  # type: ignore[no-any-return]


def test_index_unload_load(client: Any, server: tuple[str, str], repository_dir: Path) -> None:
    rows = _index(client, server)
    assert {(r["name"], r.get("version"), r["state"]) for r in rows} == {
        ("classifier", "1", "READY"), ("classifier", "2", "READY"), ("other", "1", "READY")}
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    expected = ModelRuntime(repository_dir / "classifier" / "2" / "model.onnx", threads=1).run({"input": x})[0]
    np.testing.assert_array_equal(_infer(client, x), expected)

    client.unload_model("classifier")
    assert not client.is_model_ready("classifier")
    assert client.is_model_ready("other")
    rows = _index(client, server)
    assert ("classifier", "UNAVAILABLE", "unloaded") in {(r["name"], r["state"], r.get("reason")) for r in rows}
    assert _index(client, server, ready=True) == [{"name": "other", "version": "1", "state": "READY"}]
    with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
        _infer(client, x)
    http = httpx.post(f"{server[0]}/v2/models/classifier/infer", timeout=30, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [3, 4], "data": x.reshape(-1).tolist()}]})
    assert caught.value.message() == http.json()["error"]

    client.load_model("classifier")
    assert client.is_model_ready("classifier") and client.is_model_ready("classifier", "1")
    np.testing.assert_array_equal(_infer(client, x), expected)


@pytest.mark.parametrize(("method", "name", "kwargs", "body", "code"), [
    pytest.param("load_model", "nope", {}, None, "NOT_FOUND", id="load-unknown"),
    pytest.param("unload_model", "nope", {}, None, "NOT_FOUND", id="unload-unknown"),
    pytest.param("load_model", "other", {"config": '{"max_batch_size": 4}'},
                 {"parameters": {"config": '{"max_batch_size": 4}'}}, "INVALID_ARGUMENT", id="load-with-config"),
])
def test_control_errors_are_the_http_ones(client: Any, server: tuple[str, str], method: str, name: str,
                                          kwargs: dict[str, Any], body: dict[str, Any] | None, code: str) -> None:
    with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
        getattr(client, method)(name, **kwargs)
    assert str(caught.value.status()) == f"StatusCode.{code}"
    http = httpx.post(f"{server[0]}/v2/repository/models/{name}/{method.removesuffix('_model')}", json=body,
                      timeout=30)
    assert caught.value.message() == http.json()["error"]
    assert client.is_model_ready("other")
