"""Every endpoint in-process, and every client error with its status and ``{"error": ...}`` body."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_models import LABELS, TYPES, gemm_reference

from service.config import Settings
from service.main import create_app

X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 Gemm vs float64 reference


def infer_body(x: np.ndarray = X, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            **extra}


def binary_body(x: np.ndarray, binary_output: bool = True) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": binary_output}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def assert_error(response: Any, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# ---- health and metadata -------------------------------------------------------------------------

def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_not_ready_without_serving_models(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_repository=tmp_path / "missing"))) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert_error(client.get("/v2/health/ready"), 503, "no model version serves")


def test_server_metadata(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "bnfold"
    assert "binary_tensor_data" in body["extensions"]


@pytest.mark.parametrize(("path", "version", "ready"), [
    pytest.param("/v2/models/classifier", "2", True, id="newest"),
    pytest.param("/v2/models/classifier/versions/1", "1", True, id="version-1"),
    pytest.param("/v2/models/tampered", "1", False, id="tampered"),
    pytest.param("/v2/models/corrupt", "1", False, id="corrupt"),
])
def test_model_metadata(client: TestClient, path: str, version: str, ready: bool) -> None:
    body = client.get(path).json()
    assert (body["version"], body["ready"]) == (version, ready)
    assert body["platform"] == "onnxruntime_onnx"
    if ready:
        assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert body["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        assert body["certificate"]["class_labels"] == LABELS
        assert body["certificate"]["selftest"]["passed"] is True
        assert body["reason"] is None
    else:
        assert body["inputs"] == [] and body["reason"]


@pytest.mark.parametrize(("model", "reason"), [
    pytest.param("tampered", "self-test output differs from the certificate", id="selftest-fails"),
    pytest.param("corrupt", "failed to load", id="corrupt-file"),
    pytest.param("badconfig", "unknown keys ['max_batch_sise']", id="bad-config"),
])
def test_broken_models_are_reported_not_ready(client: TestClient, model: str, reason: str) -> None:
    assert reason in client.get(f"/v2/models/{model}").json()["reason"]
    assert_error(client.get(f"/v2/models/{model}/ready"), 503, reason)
    assert_error(client.post(f"/v2/models/{model}/infer", json=infer_body()), 503, "is not ready", reason)
    metrics = client.get("/metrics").text
    assert f'bnfold_model_ready{{model="{model}",version="1"}} 0.0' in metrics


def test_broken_models_are_logged(settings: Settings, capfd: pytest.CaptureFixture[str]) -> None:
    with TestClient(create_app(settings)):
        pass
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    failed = {line["model"]: line for line in lines if line["event"] == "model not ready"}
    assert set(failed) == {"tampered", "corrupt", "badconfig"}
    assert failed["tampered"]["level"] == "error" and "self-test" in failed["tampered"]["reason"]


@pytest.mark.parametrize("path", [
    pytest.param("/v2/models/classifier/ready", id="newest"),
    pytest.param("/v2/models/classifier/versions/1/ready", id="version"),
])
def test_model_ready(client: TestClient, path: str) -> None:
    assert client.get(path).json()["ready"] is True


# ---- inference --------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "seed"), [
    pytest.param("/v2/models/classifier/infer", 2, id="newest"),
    pytest.param("/v2/models/classifier/versions/1/infer", 1, id="version-1"),
    pytest.param("/v2/models/classifier/versions/2/infer", 2, id="version-2"),
])
def test_infer_json(client: TestClient, path: str, seed: int) -> None:
    body = client.post(path, json=infer_body(id="req-7")).json()
    assert body["id"] == "req-7" and body["model_name"] == "classifier"
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [3, 3])
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, 3), gemm_reference(seed, X), **TOL)


def test_infer_nested_data(client: TestClient) -> None:
    body = infer_body()
    body["inputs"][0]["data"] = X.tolist()
    flat = client.post("/v2/models/classifier/infer", json=infer_body()).json()
    assert client.post("/v2/models/classifier/infer", json=body).json() == flat


def test_infer_binary_in_and_out(client: TestClient) -> None:
    content, headers = binary_body(X)
    response = client.post("/v2/models/classifier/infer", content=content, headers=headers)
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 36}
    logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(3, 3)
    np.testing.assert_allclose(logits, gemm_reference(2, X), **TOL)
    json_logits = client.post("/v2/models/classifier/infer", json=infer_body()).json()["outputs"][0]["data"]
    np.testing.assert_array_equal(logits.ravel(), np.asarray(json_logits, dtype=np.float32))


def test_infer_binary_in_json_out(client: TestClient) -> None:
    content, headers = binary_body(X, binary_output=False)
    response = client.post("/v2/models/classifier/infer", content=content, headers=headers)
    assert "Inference-Header-Content-Length" not in response.headers
    np.testing.assert_allclose(np.asarray(response.json()["outputs"][0]["data"]).reshape(3, 3),
                               gemm_reference(2, X), **TOL)


def test_infer_output_selection(client: TestClient) -> None:
    body = infer_body(outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
    response = client.post("/v2/models/classifier/infer", json=body)
    length = int(response.headers["Inference-Header-Content-Length"])
    assert len(response.content) == length + 36


@pytest.mark.parametrize("datatype", [pytest.param(name, id=name) for name in TYPES])
@pytest.mark.parametrize("binary", [pytest.param(False, id="json"), pytest.param(True, id="binary")])
def test_every_datatype_round_trips(client: TestClient, datatype: str, binary: bool) -> None:
    dtype = TYPES[datatype][1]
    values = (np.array([[1, 0], [0, 1]]) if datatype == "BOOL" else np.array([[1.5, -2], [3, 100]]))
    if datatype.startswith(("UINT", "INT")):
        values = np.abs(values).astype(np.int64) if datatype.startswith("U") else values.astype(np.int64)
    array = values.astype(dtype)
    inputs = []
    for name, (_, other) in TYPES.items():
        a = array if name == datatype else np.zeros((2, 2), other)
        entry: dict[str, Any] = {"name": f"in_{name}", "datatype": name, "shape": [2, 2]}
        if binary:
            entry["parameters"] = {"binary_data_size": a.nbytes}
        else:
            entry["data"] = a.ravel().tolist()
        inputs.append(entry)
    header = json.dumps({"inputs": inputs, "outputs": [{"name": f"out_{datatype}",
                                                         "parameters": {"binary_data": binary}}]}).encode()
    blobs = b"".join(np.zeros((2, 2), other).tobytes() if name != datatype else array.tobytes()
                     for name, (_, other) in TYPES.items()) if binary else b""
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    response = client.post("/v2/models/types/infer", content=header + blobs, headers=headers)
    assert response.status_code == 200, response.text
    if binary:
        length = int(response.headers["Inference-Header-Content-Length"])
        got = np.frombuffer(response.content[length:], dtype=np.uint8 if datatype == "BOOL" else dtype)
        got = got.astype(bool) if datatype == "BOOL" else got
    else:
        (output,) = response.json()["outputs"]
        assert output["datatype"] == datatype
        got = np.asarray(output["data"], dtype=dtype)
    np.testing.assert_array_equal(got.reshape(2, 2), array)


def test_predict(client: TestClient) -> None:
    predictions = client.post("/v1/models/classifier:predict", json={"instances": X.tolist()}).json()["predictions"]
    logits = gemm_reference(2, X)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert len(predictions) == 3
    for row, p in zip(expected, predictions, strict=True):
        assert p["class_index"] == int(row.argmax()) and p["label"] == LABELS[int(row.argmax())]
        np.testing.assert_allclose([p["probabilities"][label] for label in LABELS], row, rtol=1e-5, atol=1e-7)


def test_predict_without_labels_uses_indices(client: TestClient) -> None:
    x = np.ones((1, 3, 8, 8), np.float32).tolist()
    (p,) = client.post("/v1/models/conv:predict", json={"instances": x}).json()["predictions"]
    assert sorted(p["probabilities"]) == ["0", "1", "2", "3", "4"]
    assert abs(sum(p["probabilities"].values()) - 1.0) < 1e-12


def test_static_batch_model(client: TestClient) -> None:
    body = client.post("/v2/models/static/infer", json=infer_body(X[:1])).json()
    np.testing.assert_allclose(np.asarray(body["outputs"][0]["data"]).reshape(1, 3), gemm_reference(3, X[:1]), **TOL)
    assert_error(client.post("/v2/models/static/infer", json=infer_body(X)), 400, "shape [3, 4]", "[1, 4]")


def test_metrics(client: TestClient) -> None:
    client.post("/v2/models/classifier/infer", json=infer_body())
    client.post("/v2/models/classifier/infer", json={"inputs": []})
    client.post("/v2/models/nope/infer", json=infer_body())
    text = client.get("/metrics").text
    assert 'bnfold_requests_total{model="classifier",outcome="success"} 1.0' in text
    assert 'bnfold_requests_total{model="classifier",outcome="invalid_input"} 1.0' in text
    assert 'bnfold_requests_total{model="(unknown)",outcome="not_found"} 1.0' in text
    assert 'bnfold_batch_size_sum{model="classifier"} 3.0' in text
    assert 'bnfold_request_duration_seconds_count{model="classifier"} 1.0' in text
    assert 'bnfold_queue_duration_seconds_count{model="classifier"} 1.0' in text
    assert 'bnfold_model_ready{model="classifier",version="2"} 1.0' in text


# ---- client errors ----------------------------------------------------------------------------

def _input(**change: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    entry.update(change)
    return {"inputs": [entry]}


BAD_BODIES = [
    pytest.param(b"{", "malformed JSON", id="malformed-json"),
    pytest.param(b"[1, 2]", "must be a JSON object, got list", id="not-an-object"),
    pytest.param(b"{}", "non-empty 'inputs' list", id="no-inputs"),
    pytest.param(_input(name="image"), "unknown input 'image'; the model expects ['input']", id="wrong-name"),
    pytest.param(_input(datatype="FP64"), "datatype 'FP64', the model expects FP32", id="wrong-datatype"),
    pytest.param(_input(datatype="BYTES"), "datatype 'BYTES', the model expects FP32", id="bytes-datatype"),
    pytest.param(_input(shape=[1, 5], data=[1] * 5), "shape [1, 5], the model expects [-1, 4]", id="wrong-shape"),
    pytest.param(_input(shape=[4]), "shape [4], the model expects [-1, 4]", id="wrong-rank"),
    pytest.param(_input(shape=[1, -4]), "non-negative integers", id="negative-dim"),
    pytest.param(_input(shape="1,4"), "non-negative integers", id="shape-not-list"),
    pytest.param(_input(data=[1, 2, 3]), "needs 4 elements, got 3", id="too-few-elements"),
    pytest.param(_input(data=[1, 2, 3, 4, 5]), "needs 4 elements, got 5", id="too-many-elements"),
    pytest.param(_input(data=["a", "b", "c", "d"]), "holds strings", id="string-data"),
    pytest.param(_input(data=[[1, 2], [3]]), "regular (non-ragged)", id="ragged-data"),
    pytest.param(_input(data=[{"x": 1}, 2, 3, 4]), "holds mixed values or objects", id="object-data"),
    pytest.param({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}]}, "neither 'data'",
                 id="no-data"),
    pytest.param({"inputs": [_input()["inputs"][0]] * 2}, "appears twice", id="duplicate-input"),
    pytest.param({**_input(), "outputs": [{"name": "probs"}]}, "unknown output 'probs'", id="unknown-output"),
    pytest.param({**_input(), "outputs": "logits"}, "'outputs' must be a list", id="outputs-not-list"),
    pytest.param({**_input(), "id": 5}, "'id' must be a string", id="id-not-string"),
    pytest.param({**_input(), "parameters": {"binary_data_output": "yes"}}, "must be true or false",
                 id="binary-output-not-bool"),
    pytest.param({"inputs": [{**_input()["inputs"][0], "parameters": {"binary_data_size": 16}}]},
                 "no Inference-Header-Content-Length", id="binary-without-header"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_infer_rejects_bad_body(client: TestClient, body: Any, message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert_error(client.post("/v2/models/classifier/infer", content=content), 400, message)


@pytest.mark.parametrize(("data", "message"), [
    pytest.param([1.5, 0], "holds floats", id="float-for-int"),
    pytest.param([300, 0], "values [0, 300] do not fit INT8 [-128, 127]", id="overflow"),
    pytest.param([True, False], "holds booleans", id="bool-for-int"),
])
def test_integer_inputs_are_checked(client: TestClient, data: list[Any], message: str) -> None:
    inputs = [{"name": f"in_{n}", "datatype": n, "shape": [1, 2], "data": [False, False] if n == "BOOL" else [0, 0]}
              for n in TYPES]
    inputs[[f"in_{n}" for n in TYPES].index("in_INT8")]["data"] = data
    assert_error(client.post("/v2/models/types/infer", json={"inputs": inputs}), 400, message)


def _uint64_request(data: list[Any]) -> dict[str, Any]:
    inputs = [{"name": f"in_{n}", "datatype": n, "shape": [2, 2], "data": [False] * 4 if n == "BOOL" else [0] * 4}
              for n in TYPES]
    inputs[[f"in_{n}" for n in TYPES].index("in_UINT64")]["data"] = data
    return {"inputs": inputs, "outputs": [{"name": "out_UINT64"}]}


def test_uint64_json_values_past_int64_stay_exact(client: TestClient) -> None:
    """numpy infers float64 for [2**64 - 1, 1]; the service must not round (or refuse) such integers."""
    data = [2**64 - 1, 1, 2**63, 0]
    response = client.post("/v2/models/types/infer", json=_uint64_request(data))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == data


@pytest.mark.parametrize(("data", "message"), [
    pytest.param([2**64, 0, 0, 0], "holds floats", id="past-2**64"),  # JSON parsing makes it a float
    pytest.param([2**63, -1, 0, 0], "values [-1, 9223372036854775808] do not fit UINT64", id="negative"),
    pytest.param([2**63, 1.5, 0, 0], "holds floats", id="float"),
    pytest.param([2**63, True, 0, 0], "holds floats", id="bool"),
])
def test_uint64_json_values_are_checked(client: TestClient, data: list[Any], message: str) -> None:
    assert_error(client.post("/v2/models/types/infer", json=_uint64_request(data)), 400, message)


def test_missing_input(client: TestClient) -> None:
    inputs = [{"name": "in_FP32", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]
    assert_error(client.post("/v2/models/types/infer", json={"inputs": inputs}), 400, "missing inputs ['in_BOOL'")


@pytest.mark.parametrize(("header", "extra", "message"), [
    pytest.param("abc", b"", "must be an integer, got 'abc'", id="header-not-int"),
    pytest.param("0", b"", "Inference-Header-Content-Length is 0", id="header-zero"),
    pytest.param("100000", b"", "is 100000 but the body has", id="header-past-body"),
    pytest.param(None, b"\x00" * 8, "binary data has 24 bytes but the inputs' binary_data_size add up to 16",
                 id="extra-bytes"),
    pytest.param(None, b"", "binary_data_size says 15", id="wrong-size"),
    pytest.param(None, b"", "which has only", id="truncated"),
])
def test_binary_framing_errors(client: TestClient, header: str | None, extra: bytes, message: str) -> None:
    x = np.ones((1, 4), np.float32)
    size = 15 if "says 15" in message else x.nbytes
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": size}}]}).encode()
    blob = x.tobytes()[:8] if message == "which has only" else x.tobytes()
    if message == "which has only":
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                       "parameters": {"binary_data_size": 16}}]}).encode()
    response = client.post("/v2/models/classifier/infer", content=head + blob + extra,
                           headers={"Inference-Header-Content-Length": header or str(len(head))})
    assert_error(response, 400, message)


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    pytest.param("post", "/v2/models/nope/infer", 404, "unknown model 'nope'", id="unknown-model"),
    pytest.param("post", "/v2/models/classifier/versions/9/infer", 404, "has no version '9'; it has [1, 2]",
                 id="unknown-version"),
    pytest.param("post", "/v2/models/classifier/versions/abc/infer", 404, "no version 'abc'", id="bad-version"),
    pytest.param("get", "/v2/models/nope", 404, "unknown model", id="metadata-unknown"),
    pytest.param("get", "/v2/models/classifier/versions/3", 404, "no version '3'", id="metadata-version"),
    pytest.param("get", "/v2/models/nope/ready", 404, "unknown model", id="ready-unknown"),
    pytest.param("post", "/v1/models/nope:predict", 404, "unknown model", id="predict-unknown"),
    pytest.param("get", "/no/such/route", 404, "Not Found", id="route-404"),
    pytest.param("get", "/v2/models/classifier/infer", 405, "Method Not Allowed", id="route-405"),
])
def test_not_found(client: TestClient, method: str, path: str, status: int, message: str) -> None:
    assert_error(getattr(client, method)(path, **({"json": infer_body()} if method == "post" else {})), status,
                 message)


@pytest.mark.parametrize(("body", "message"), [
    pytest.param({"instances": []}, "non-empty 'instances'", id="empty"),
    pytest.param({"inputs": [[1, 2, 3, 4]]}, "non-empty 'instances'", id="no-instances"),
    pytest.param({"instances": [[1, 2, 3]]}, "shape [1, 3], the model expects [-1, 4]", id="wrong-shape"),
    pytest.param({"instances": [[1, 2, 3, 4], [1]]}, "non-ragged", id="ragged"),
    pytest.param({"instances": [["a", "b", "c", "d"]]}, "holds strings", id="strings"),
])
def test_predict_rejects_bad_body(client: TestClient, body: dict[str, Any], message: str) -> None:
    assert_error(client.post("/v1/models/classifier:predict", json=body), 400, message)


def test_predict_multi_input_model_refused(client: TestClient) -> None:
    response = client.post("/v1/models/types:predict", json={"instances": [[1, 2]]})
    assert_error(response, 400, "needs a model with one input")


# ---- limits ---------------------------------------------------------------------------------

@pytest.fixture
def small_client(repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=repository, max_body_bytes=1024, max_queue_size=1, max_batch_size=1,
                        intra_op_threads=1, retry_after_s=3)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_413_from_content_length_before_reading(small_client: TestClient) -> None:
    read = []

    def body() -> Iterator[bytes]:  # the declared length says too much: the body must never be pulled
        read.append(True)
        yield b"x" * 10

    response = small_client.post("/v2/models/classifier/infer", content=body(), headers={"Content-Length": "5000"})
    assert_error(response, 413, "5000 bytes exceeds the limit of 1024")
    assert read == []


def test_413_for_chunked_body(small_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    assert_error(small_client.post("/v2/models/classifier/infer", content=chunks()), 413, "limit of 1024")


@pytest.mark.parametrize(("declared", "status"), [
    pytest.param("-1", 400, id="negative"), pytest.param("1e3", 400, id="float"),
    pytest.param("9" * 5000, 413, id="5000-digits"),
])
def test_bad_content_length(small_client: TestClient, declared: str, status: int) -> None:
    response = small_client.post("/v2/models/classifier/infer", content=b"{}", headers={"Content-Length": declared})
    assert_error(response, status, "Content-Length" if status == 400 else "exceeds the limit")


def test_503_with_retry_after_when_queue_is_full(small_client: TestClient) -> None:
    entry = small_client.app.state.service.repository.get("classifier")  # type: ignore[attr-defined]
    runtime = entry.runtime
    started, release = threading.Event(), threading.Event()
    original = runtime.run

    def blocking_run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        started.set()
        release.wait(60)
        return original(feeds)

    entry.batcher._run = blocking_run
    small = infer_body(X[:1])
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(small_client.post, "/v2/models/classifier/infer", json=small)
        assert started.wait(60)
        queued = pool.submit(small_client.post, "/v2/models/classifier/infer", json=small)
        deadline = time.monotonic() + 60
        while entry.batcher.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = small_client.post("/v2/models/classifier/infer", json=small)
        assert_error(response, 503, "already has 1 requests queued")
        assert response.headers["Retry-After"] == "3"
        release.set()
        assert running.result(60).status_code == 200
        assert queued.result(60).status_code == 200
    assert 'outcome="unavailable"} 1.0' in small_client.get("/metrics").text


def test_validation_errors_use_error_body(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/typed/{number}")
    async def typed(number: int) -> int:
        return number

    with TestClient(app) as client:
        assert_error(client.get("/typed/abc"), 400, "invalid request: path.number")


@pytest.mark.parametrize("misalign", [pytest.param(k, id=f"offset-mod-8-is-{k}") for k in range(4)])
def test_binary_input_alignment_does_not_matter(client: TestClient, misalign: int) -> None:
    """Binary tensors are views into the body at any offset; results equal the JSON path exactly."""
    x = np.random.default_rng(4).standard_normal((1, 4)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    head += b" " * ((misalign - len(head)) % 8)
    assert len(head) % 8 == misalign
    response = client.post("/v2/models/classifier/infer", content=head + x.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(head))})
    via_json = client.post("/v2/models/classifier/infer", json=infer_body(x)).json()["outputs"][0]["data"]
    assert response.json()["outputs"][0]["data"] == via_json


@pytest.mark.parametrize("encoding", [pytest.param("gzip", id="gzip"), pytest.param("deflate", id="deflate")])
def test_compressed_request(client: TestClient, encoding: str) -> None:
    import gzip
    import zlib

    raw = json.dumps(infer_body()).encode()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    response = client.post("/v2/models/classifier/infer", content=packed, headers={"Content-Encoding": encoding})
    assert response.json() == client.post("/v2/models/classifier/infer", content=raw).json()


@pytest.mark.parametrize(("encoding", "payload", "status", "message"), [
    pytest.param("br", b"{}", 415, "Content-Encoding 'br' is not supported", id="unknown-encoding"),
    pytest.param("gzip", b"not gzip", 400, "not valid gzip data", id="corrupt-gzip"),
])
def test_bad_compressed_request(client: TestClient, encoding: str, payload: bytes, status: int, message: str) -> None:
    response = client.post("/v2/models/classifier/infer", content=payload, headers={"Content-Encoding": encoding})
    assert_error(response, status, message)


def test_413_for_a_decompression_bomb(small_client: TestClient) -> None:
    import gzip

    bomb = gzip.compress(b" " * 1_000_000)  # ~1 kB on the wire, 1 MB inflated
    assert len(bomb) < 1024
    response = small_client.post("/v2/models/classifier/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert_error(response, 413, "inflated request body exceeds the limit of 1024 bytes")


@pytest.mark.parametrize("binary", [pytest.param(False, id="json"), pytest.param(True, id="binary")])
def test_string_outputs(client: TestClient, binary: bool) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2]}],
            "outputs": [{"name": "text", "parameters": {"binary_data": binary}}]}
    response = client.post("/v2/models/strings/infer", json=body)
    assert response.status_code == 200, response.text
    if binary:
        length = int(response.headers["Inference-Header-Content-Length"])
        assert json.loads(response.content[:length])["outputs"][0]["datatype"] == "BYTES"
        assert response.content[length:] == b"\x03\x00\x00\x001.5\x02\x00\x00\x00-2"
    else:
        assert response.json()["outputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [1, 2],
                                                 "data": ["1.5", "-2"]}
