"""Memory of a real server under an address-space limit: big requests are refused before they allocate,
accepted ones stay inside the pod's budget and give their memory back, and a mixed soak leaves RSS
near its baseline with no 5xx.

Once warmed up, the server gets ``RLIMIT_AS`` = its peak address space so far plus :data:`HEADROOM`
(``prlimit``; onnxruntime, numpy and glibc reserve virtual memory they never touch, so the limit
is relative to what the process has already mapped). ``MALLOC_ARENA_MAX=2`` keeps glibc from
reserving 64 MiB of address space per thread. Before the limits, one 60 kB gzip body declaring
``[480000, 1, 8, 8]`` took RSS from 96 MiB to 4.3 GiB for good; under this limit it would fail
to allocate instead.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from server_process import free_port, is_ready, start, stop, wait_until

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
HEADROOM = 1024 * MiB  # address space allowed beyond the idle server's (the shipped pod's memory limit is 1 GiB)
RSS_SLACK = 64 * MiB  # RSS after a big request or the soak may exceed the warmed-up baseline by this much


def digits_like() -> onnx.ModelProto:
    """input [N,1,8,8] -> Conv 8 -> Relu -> Conv 16 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits [N,10]."""
    rng = np.random.default_rng(11)

    def tensor(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "digits_like",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [tensor("W1", 8, 1, 3, 3), tensor("B1", 8), tensor("W2", 16, 8, 3, 3), tensor("B2", 16),
                               tensor("W3", 10, 16), tensor("B3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` size field in bytes (VmRSS, VmSize, VmPeak, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Server:
    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid

    def rss(self) -> int:
        return _status(self.pid, "VmRSS")

    def infer(self, body: bytes, headers: dict[str, str] | None = None, timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}/v2/models/digits/infer", content=body, headers=headers or {}, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = tmp_path_factory.mktemp("models")
    (models / "digits" / "1").mkdir(parents=True)
    (models / "digits" / "1" / "model.onnx").write_bytes(digits_like().SerializeToString())
    port = free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(models), "BNFOLD_PORT": str(port), "BNFOLD_HOST": "127.0.0.1",
           "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_LOG_LEVEL": "error", "MALLOC_ARENA_MAX": "2"}
    process = start(env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(process, lambda: is_ready(url), "readiness")
        running = Server(url, process.pid)
        _warm(running)
        limit = _status(process.pid, "VmPeak") + HEADROOM
        resource.prlimit(process.pid, resource.RLIMIT_AS, (limit, limit))
        yield running
    finally:
        stop(process)


def _json(rows: int, value: float = 0.5) -> bytes:
    data = ",".join([repr(value)] * (rows * 64))
    return f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[{rows},1,8,8],"data":[{data}]}}]}}'.encode()


def _binary(rows: int) -> tuple[bytes, dict[str, str]]:
    raw = np.random.default_rng(rows).random((rows, 1, 8, 8), dtype=np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 1, 8, 8],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _warm(server: Server) -> None:
    for rows in (1, 8, 64):
        assert server.infer(_json(rows)).status_code == 200
        body, headers = _binary(rows)
        assert server.infer(body, headers).status_code == 200


def _settle(server: Server, baseline: int, what: str) -> int:
    """RSS once back within :data:`RSS_SLACK` of ``baseline`` (memory is trimmed in a thread), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        rss = server.rss()
        if rss <= baseline + RSS_SLACK or time.monotonic() > deadline:
            print(f"{what}: RSS baseline {baseline / MiB:.0f} MiB, after {rss / MiB:.0f} MiB, "
                  f"peak so far {_status(server.pid, 'VmHWM') / MiB:.0f} MiB")
            return rss
        time.sleep(0.2)


def _gzip_zeros(shape: list[int]) -> bytes:
    """A gzip JSON body whose data is ``0,0,...`` for ``shape``, compressed as it is made (60 kB for 31M zeros)."""
    count = int(np.prod(shape))
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":{shape},"data":['.encode())]
    block = b"0," * 1_000_000
    for _ in range(count // 1_000_000):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b"0," * (count % 1_000_000) + b"0]}]}"))
    parts.append(packer.flush())
    return b"".join(parts)


def test_the_60kb_gzip_request_of_480000_rows_is_refused_and_rss_stays_bounded(server: Server) -> None:
    _warm(server)
    baseline = server.rss()
    body = _gzip_zeros([480000, 1, 8, 8])
    assert len(body) < 100_000
    response = server.infer(body, {"Content-Encoding": "gzip"})
    assert response.status_code == 413, response.text
    assert "BNFOLD_MAX_BODY_BYTES" in response.json()["error"]
    # The same declared shape in a small body: refused from the shape, before any array exists.
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [480000, 1, 8, 8],
                                   "parameters": {"binary_data_size": 480000 * 256}}]}).encode()
    response = server.infer(head, {"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 413, response.text
    assert response.json()["error"] == ("input 'input' has 480000 rows, over the limit of 1024 rows per request "
                                        "(BNFOLD_MAX_REQUEST_ROWS); split it into several requests")
    assert _settle(server, baseline, "480000 rows refused") <= baseline + RSS_SLACK
    assert httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200


@pytest.mark.parametrize("kind", [
    pytest.param("max-rows-json", id="max-rows-json"),
    pytest.param("max-rows-binary", id="max-rows-binary"),
    pytest.param("max-json-nested", id="max-json-of-the-costliest-shape"),
])
def test_the_largest_accepted_requests_fit_and_give_memory_back(server: Server, kind: str) -> None:
    """Each is at a limit's edge: the server answers (no allocation failure under RLIMIT_AS) and RSS returns."""
    _warm(server)
    baseline = server.rss()
    if kind == "max-rows-json":
        response = server.infer(_json(1024, 0.123456789))
        assert response.status_code == 200, response.text
    elif kind == "max-rows-binary":
        response = server.infer(*_binary(1024))
        assert response.status_code == 200, response.text
    else:  # 4 MiB of [[[0]]],...: the JSON that orjson turns into the most memory per byte; refused as data
        item = b"[[[0]]],"
        body = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,8,8],"data":[' + \
            item * ((4 * MiB - 200) // len(item)) + b'0]}]}'
        assert len(body) <= 4 * MiB
        response = server.infer(body)
        assert response.status_code == 400, response.text
    assert _settle(server, baseline, kind) <= baseline + RSS_SLACK


def _soak_requests(rng: random.Random) -> list[tuple[str, str, bytes, dict[str, str], set[int]]]:
    """(name, path, body, headers, acceptable statuses): good and bad requests, mixed."""
    good_json = _json(4)
    good_binary, binary_headers = _binary(16)
    predict = json.dumps({"instances": np.zeros((3, 1, 8, 8)).tolist()}).encode()
    packed = gzip.compress(_json(32))
    infer = "/v2/models/digits/infer"
    cases: list[tuple[str, str, bytes, dict[str, str], set[int]]] = [
        ("json", infer, good_json, {}, {200}),
        ("binary", infer, good_binary, binary_headers, {200}),
        ("predict", "/v1/models/digits:predict", predict, {}, {200}),
        ("gzip", infer, packed, {"Content-Encoding": "gzip"}, {200}),
        ("big-json", infer, _json(1024), {}, {200}),
        ("malformed", infer, b'{"inputs": [', {}, {400}),
        ("wrong-shape", infer, good_json.replace(b"[4,1,8,8]", b"[4,1,8,9]"), {}, {400}),
        ("not-finite", infer, _json(1, 1e300), {}, {400}),
        ("too-many-rows", infer, good_json.replace(b"[4,1,8,8]", b"[5000,1,8,8]"), {}, {413}),
        ("truncated-gzip", infer, packed[:-4], {"Content-Encoding": "gzip"}, {400}),
        ("trailing-gzip", infer, packed + b"junk", {"Content-Encoding": "gzip"}, {400}),
        ("unknown-model", "/v2/models/nope/infer", good_json, {}, {404}),
        ("absurd-version", "/v2/models/digits/versions/" + "9" * 4301 + "/infer", good_json, {}, {404}),
        ("bad-header-length", infer, good_binary, {"Inference-Header-Content-Length": "x"}, {400}),
    ]
    return [cases[rng.randrange(len(cases))] for _ in range(400)]


def test_soak_of_mixed_requests_has_no_5xx_and_rss_returns_near_baseline(server: Server) -> None:
    _warm(server)
    baseline = server.rss()
    requests = _soak_requests(random.Random(5))
    began = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        lock = threading.Lock()
        statuses: dict[str, list[int]] = {}

        def send(case: tuple[str, str, bytes, dict[str, str], set[int]]) -> None:
            name, path, body, headers, _ = case
            status = client.post(path, content=body, headers=headers).status_code
            with lock:
                statuses.setdefault(name, []).append(status)

        list(pool.map(send, requests))
    elapsed = time.monotonic() - began
    expected = {name: allowed for name, _, _, _, allowed in requests}
    wrong = {name: sorted(set(got) - expected[name]) for name, got in statuses.items() if set(got) - expected[name]}
    assert wrong == {}, statuses
    assert sum(len(v) for v in statuses.values()) == len(requests)
    assert _settle(server, baseline, f"soak of {len(requests)} requests in {elapsed:.1f} s") <= baseline + RSS_SLACK
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200
