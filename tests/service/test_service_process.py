"""A real ``python -m service`` process driven by tritonclient.http, and concurrent clients.

Results must equal onnxruntime run in-process exactly (same runtime, same graph optimizations).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from server_process import free_port, is_ready, start, stop, wait_until

from service.runtime import ModelRuntime

pytestmark = pytest.mark.slow
LIMIT = 1_000_000  # request body limit of the test server


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_MAX_QUEUE_DELAY_MS": "2",
           "BNFOLD_MAX_BODY_BYTES": str(LIMIT)}
    process = start(env)
    try:
        wait_until(process, lambda: is_ready(f"http://127.0.0.1:{port}"), "readiness")
        yield f"127.0.0.1:{port}"
    finally:
        stop(process)


def _in_process(repository: Path, model: str, version: int, x: np.ndarray) -> np.ndarray:
    runtime = ModelRuntime(repository / model / str(version) / "model.onnx", threads=1)
    return runtime.run({"input": x})[0]


def test_tritonclient(server: str, repository: Path) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier") and client.is_model_ready("classifier", "1")
    assert not client.is_model_ready("tampered")
    metadata = client.get_model_metadata("classifier")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["versions"] == ["1", "2"]
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    expected = {v: _in_process(repository, "classifier", v, x) for v in (1, 2)}
    for binary_in in (False, True):
        for binary_out in (False, True):
            for version in ("", "1"):
                inp = triton.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                out = triton.InferRequestedOutput("logits", binary_data=binary_out)
                result = client.infer("classifier", [inp], model_version=version, outputs=[out], request_id="r1")
                got = result.as_numpy("logits")
                np.testing.assert_array_equal(got, expected[int(version or 2)])
                assert result.get_response()["id"] == "r1"
    # tritonclient's defaults: binary input, binary output, no outputs listed
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("classifier", [inp]).as_numpy("logits"), expected[2])
    for algorithm in ("gzip", "deflate"):  # tritonclient's request compression; responses stay uncompressed
        result = client.infer("classifier", [inp], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("logits"), expected[2])
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    client.close()


def test_concurrent_requests_get_their_own_rows(server: str, repository: Path) -> None:
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 3, 8, 8)).astype(np.float32) for _ in range(96)]
    runtime = ModelRuntime(repository / "conv" / "1" / "model.onnx", threads=1)
    expected = [runtime.run({"input": x})[0] for x in inputs]

    def metric_sum() -> tuple[float, float]:
        text = httpx.get(f"http://{server}/metrics", timeout=30).text
        total = re.search(r'bnfold_batch_size_sum\{model="conv"\} (\S+)', text)
        count = re.search(r'bnfold_batch_size_count\{model="conv"\} (\S+)', text)
        return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)

    rows_before, runs_before = metric_sum()
    with httpx.Client(base_url=f"http://{server}", limits=httpx.Limits(max_connections=32),
                      timeout=30) as client:
        def call(x: np.ndarray) -> np.ndarray:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                "data": x.ravel().tolist()}]}
            response = client.post("/v2/models/conv/infer", json=body)
            assert response.status_code == 200, response.text
            (out,) = response.json()["outputs"]
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, inputs))
    for got, want in zip(results, expected, strict=True):
        # JSON floats round-trip float32 exactly, but batched runs may sum in another order.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    rows_after, runs_after = metric_sum()
    assert rows_after - rows_before == sum(x.shape[0] for x in inputs)
    assert runs_after - runs_before < len(inputs), "no request was coalesced with another"
    assert httpx.get(f"http://{server}/v2/health/live", timeout=30).status_code == 200


def test_in_process_reference_is_unoptimized_equivalent(repository: Path) -> None:
    """The service's session (all graph optimizations) agrees with an unoptimized reference session."""
    x = np.random.default_rng(5).standard_normal((4, 3, 8, 8)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(repository / "conv" / "1" / "model.onnx"), options).run(None, {"input": x})[0]
    served = ModelRuntime(repository / "conv" / "1" / "model.onnx", threads=1).run({"input": x})[0]
    np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-6)


def _raw(server: str, request: bytes, then: bytes = b"") -> bytes:
    """Send raw HTTP/1.1 bytes; return what the server answers within 10 s."""
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        if then:
            with contextlib.suppress(OSError):  # the server may already have answered and closed
                sock.sendall(then)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_413_from_content_length_without_sending_the_body(server: str) -> None:
    began = time.monotonic()
    answer = _raw(server, b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 500000000\r\n\r\n")  # the body never comes
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"request body of 500000000 bytes exceeds the limit of 1000000 bytes (BNFOLD_MAX_BODY_BYTES)"' \
        in answer
    assert time.monotonic() - began < 9  # answered, not left waiting for the body until _raw's 10 s timeout


def test_413_for_chunked_body_over_the_limit(server: str) -> None:
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    answer = _raw(server, b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n", body + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"exceeds the limit of 1000000 bytes" in answer
    assert httpx.get(f"http://{server}/v2/health/live", timeout=30).status_code == 200
