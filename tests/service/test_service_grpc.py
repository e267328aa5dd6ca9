"""A real ``python -m service`` with ``BNFOLD_GRPC_PORT``, driven by tritonclient.grpc as Triton programs use it.

One server (API key set, small limits) for the whole module. Answers must equal onnxruntime run
in-process exactly (same runtime, same session options); error codes and messages must be those of
the HTTP side for the same mistake (its ``{"error": ...}`` body, fetched from the same server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
from onnx import helper
from server_process import free_port, is_ready, log_text, start, stop, wait_until
from service_models import OPSET, TYPES, write_repository

from service.runtime import ModelRuntime

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}
BODY_LIMIT = 1_000_000  # BNFOLD_MAX_BODY_BYTES of the test server
ROWS_LIMIT = 64  # BNFOLD_MAX_REQUEST_ROWS
# Protocol datatype -> the typed contents field holding it (the protocol's table; FP16 has none).
FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
          "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
          "FP64": "fp64_contents"}


def identity_model(datatype: str) -> onnx.ModelProto:
    """x [N,3] -> Identity -> y [N,3] in ``datatype``."""
    elem = TYPES[datatype][0]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], f"id_{datatype}",
                              [helper.make_tensor_value_info("x", elem, ["N", 3])],
                              [helper.make_tensor_value_info("y", elem, ["N", 3])])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


@pytest.fixture(scope="module")
def grpc_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_repository(tmp_path_factory.mktemp("grpc_models"))
    for datatype in TYPES:
        path = root / f"id_{datatype.lower()}" / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(identity_model(datatype).SerializeToString())
    return root


@pytest.fixture(scope="module")
def server(grpc_repository: Path) -> Iterator[tuple[str, str]]:
    """(HTTP URL, gRPC address) of a server over ``grpc_repository``."""
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(grpc_repository), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1",
           "BNFOLD_MAX_QUEUE_DELAY_MS": "2", "BNFOLD_MAX_BODY_BYTES": str(BODY_LIMIT),
           "BNFOLD_MAX_REQUEST_ROWS": str(ROWS_LIMIT), "BNFOLD_API_KEY": KEY}
    process = start(env)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_until(process, lambda: is_ready(url), "readiness")
        address = f"127.0.0.1:{grpc_port}"
        wait_until(process, lambda: _grpc_live(address), "gRPC liveness")
        yield url, address
    finally:
        log = log_text(process)
        stop(process)
    assert "Traceback" not in log


def _grpc_live(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            return bool(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live)
        except grpc.RpcError:
            return False


@pytest.fixture
def client(server: tuple[str, str]) -> Iterator[Any]:
    triton = tritonclient_grpc.InferenceServerClient(server[1])
    yield triton
    triton.close()


@pytest.fixture
def stub(server: tuple[str, str]) -> Iterator[Any]:
    with grpc.insecure_channel(server[1]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _in_process(repository: Path, model: str, version: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    runtime = ModelRuntime(repository / model / str(version) / "model.onnx", threads=1)
    return runtime.run(feeds)


def _values(datatype: str, rows: int = 4) -> np.ndarray:
    """Values of ``datatype`` shaped [rows, 3], its extremes included for the integer types."""
    dtype = TYPES[datatype][1]
    rng = np.random.default_rng(len(datatype))
    if datatype == "BOOL":
        return rng.integers(0, 2, (rows, 3)).astype(bool)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, (rows, 3), dtype=dtype, endpoint=True)
        values.flat[:2] = [info.min, info.max]
        return values
    return (rng.standard_normal((rows, 3)) * 100).astype(dtype)


# -- health and metadata ---------------------------------------------------------------------------


def test_health_needs_no_key(server: tuple[str, str]) -> None:
    triton = tritonclient_grpc.InferenceServerClient(server[1])
    assert triton.is_server_live() and triton.is_server_ready()
    triton.close()


def test_model_ready(client: Any) -> None:
    assert client.is_model_ready("classifier", headers=AUTH)
    assert client.is_model_ready("classifier", "1", headers=AUTH)
    assert not client.is_model_ready("tampered", headers=AUTH)  # its self-test fails
    assert not client.is_model_ready("nope", headers=AUTH)  # as Triton: false, not an error
    assert not client.is_model_ready("classifier", "7", headers=AUTH)


def test_metadata_matches_http(client: Any, server: tuple[str, str]) -> None:
    http = httpx.get(f"{server[0]}/v2/models/classifier", headers=AUTH, timeout=30).json()
    metadata = client.get_model_metadata("classifier", headers=AUTH, as_json=True)
    assert metadata["name"] == "classifier" and metadata["platform"] == http["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == http["versions"] == ["1", "2"]
    for key in ("inputs", "outputs"):
        got = [{**t, "shape": [int(d) for d in t["shape"]]} for t in metadata[key]]  # JSON has int64 as strings
        assert got == http[key]
    server_metadata = client.get_server_metadata(headers=AUTH, as_json=True)
    assert server_metadata["name"] == "bnfold"
    assert server_metadata["extensions"] == httpx.get(f"{server[0]}/v2", headers=AUTH, timeout=30).json()["extensions"]


def test_model_config_describes_full_shapes(client: Any) -> None:
    config = client.get_model_config("classifier", headers=AUTH).config
    assert config.max_batch_size == 0  # shapes include the batch dimension, as clients send them
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [-1, 4])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [-1, 3])]
    assert tritonclient_grpc.model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP32"


# -- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_infer_raw_is_bit_exact(client: Any, grpc_repository: Path, version: str) -> None:
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    expected = _in_process(grpc_repository, "classifier", int(version or 2), {"input": x})[0]
    inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("classifier", [inp], model_version=version, request_id="r1", headers=AUTH,
                          outputs=[tritonclient_grpc.InferRequestedOutput("logits")])
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r1", "classifier", version or "2")
    for algorithm in ("gzip", "deflate"):  # tritonclient's message compression
        compressed = client.infer("classifier", [inp], model_version=version, headers=AUTH,
                                  compression_algorithm=algorithm)
        np.testing.assert_array_equal(compressed.as_numpy("logits"), expected)


def test_infer_every_datatype_raw(client: Any, grpc_repository: Path) -> None:
    """The types model: one request carrying every datatype, raw in and raw out."""
    feeds = {f"in_{dt}": _values(dt)[:, :2] for dt in TYPES}
    inputs = []
    for name, array in feeds.items():
        inp = tritonclient_grpc.InferInput(name, list(array.shape), name.removeprefix("in_"))
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer("types", inputs, headers=AUTH)
    expected = _in_process(grpc_repository, "types", 1, feeds)
    for (name, array), want in zip(feeds.items(), expected, strict=True):
        got = result.as_numpy(name.replace("in_", "out_"))
        assert got.dtype == array.dtype, name
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("datatype", sorted(FIELDS))
def test_infer_typed_contents(stub: Any, grpc_repository: Path, datatype: str) -> None:
    """Typed ``contents`` in; typed out when the request asks for no binary data, raw out by default."""
    x = _values(datatype)
    expected = _in_process(grpc_repository, f"id_{datatype.lower()}", 1, {"x": x})[0]
    request = pb.ModelInferRequest(model_name=f"id_{datatype.lower()}")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=x.shape)
    getattr(tensor.contents, FIELDS[datatype]).extend(x.reshape(-1).tolist())
    raw = stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert len(raw.raw_output_contents) == 1 and not raw.outputs[0].HasField("contents")
    got = np.frombuffer(raw.raw_output_contents[0], TYPES[datatype][1]).reshape(list(raw.outputs[0].shape))
    np.testing.assert_array_equal(got, expected)
    request.parameters["binary_data_output"].bool_param = False
    typed = stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert not typed.raw_output_contents
    output = typed.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("y", datatype, [4, 3])
    got = np.array(getattr(output.contents, FIELDS[datatype]), dtype=TYPES[datatype][1]).reshape(4, 3)
    np.testing.assert_array_equal(got, expected)


def test_infer_fp16_raw(client: Any, grpc_repository: Path) -> None:
    x = _values("FP16")
    inp = tritonclient_grpc.InferInput("x", list(x.shape), "FP16")
    inp.set_data_from_numpy(x)
    got = client.infer("id_fp16", [inp], headers=AUTH).as_numpy("y")
    np.testing.assert_array_equal(got, _in_process(grpc_repository, "id_fp16", 1, {"x": x})[0])
    assert got.dtype == np.float16


def test_bytes_output(client: Any) -> None:
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    inp = tritonclient_grpc.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("strings", [inp], headers=AUTH).as_numpy("text")
    assert got.shape == (1, 2) and [float(v) for v in got.reshape(-1)] == [1.5, -2.0]


def test_concurrent_clients_get_their_own_rows(server: tuple[str, str], grpc_repository: Path) -> None:
    """Requests from several threads at once (batched together by the server) each get their own answer."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [np.random.default_rng(k).standard_normal((1 + k % 3, 4)).astype(np.float32) for k in range(48)]
    runtime = ModelRuntime(grpc_repository / "classifier" / "2" / "model.onnx", threads=1)

    def one(x: np.ndarray) -> np.ndarray:
        triton = tritonclient_grpc.InferenceServerClient(server[1])
        inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            return triton.infer("classifier", [inp], headers=AUTH).as_numpy("logits")  # type: ignore[no-any-return]
        finally:
            triton.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_array_equal(got, runtime.run({"input": x})[0])


# -- errors: codes, and the HTTP side's messages ---------------------------------------------------


def _code(exc: Any) -> str:
    return str(exc.status()).removeprefix("StatusCode.")


def _http_error(url: str, model: str, header: dict[str, Any], binary: bytes = b"") -> tuple[int, str]:
    import orjson

    body = orjson.dumps(header)
    headers = {**AUTH, "Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(body))
    response = httpx.post(f"{url}/v2/models/{model}/infer", content=body + binary, headers=headers, timeout=30)
    return response.status_code, response.json()["error"]


BAD = {  # id -> the same mistake for HTTP and gRPC: model, input name, shape, datatype, data
    "wrong-datatype": ("classifier", "input", [2, 4], "INT32", np.zeros((2, 4), np.int32)),
    "wrong-shape": ("classifier", "input", [2, 5], "FP32", np.zeros((2, 5), np.float32)),
    "unknown-input": ("classifier", "inputs", [2, 4], "FP32", np.zeros((2, 4), np.float32)),
    "too-many-rows": ("classifier", "input", [ROWS_LIMIT + 1, 4], "FP32", np.zeros((ROWS_LIMIT + 1, 4), np.float32)),
    "size-mismatch": ("classifier", "input", [2, 4], "FP32", np.zeros(7, np.float32)),
}
RAW_ONLY = {"not-finite": ("classifier", "input", [1, 4], "FP32", np.array([[0, np.inf, 0, np.nan]], np.float32))}
TYPED_ONLY = {"int-out-of-range": ("id_int8", "x", [1, 3], "INT8", np.array([[1, 200, 3]], np.int32))}
CODES = {400: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED", 404: "NOT_FOUND", 503: "UNAVAILABLE"}


@pytest.mark.parametrize("case", sorted({**BAD, **RAW_ONLY}))
def test_raw_mistakes_get_the_http_message(stub: Any, server: tuple[str, str], case: str) -> None:
    model, name, shape, datatype, data = {**BAD, **RAW_ONLY}[case]
    status, message = _http_error(server[0], model, {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                                      "parameters": {"binary_data_size": data.nbytes}}]},
                                  data.tobytes())
    request = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape)], raw_input_contents=[data.tobytes()])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert (caught.value.code().name, caught.value.details()) == (CODES[status], message)


@pytest.mark.parametrize("case", sorted({**BAD, **TYPED_ONLY}))
def test_typed_mistakes_get_the_http_message(stub: Any, server: tuple[str, str], case: str) -> None:
    model, name, shape, datatype, data = {**BAD, **TYPED_ONLY}[case]
    header = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data.reshape(-1).tolist()}]}
    status, message = _http_error(server[0], model, header)
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, FIELDS[datatype]).extend(data.reshape(-1).tolist())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert (caught.value.code().name, caught.value.details()) == (CODES[status], message)


def test_typed_non_finite_is_invalid(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [0.0, float("inf"), 0.0, float("nan")])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "input 'input' contents has 2 values that are not finite (inf or NaN)"


@pytest.mark.parametrize(("model", "version", "code", "message"), [
    pytest.param("nope", "", "NOT_FOUND", "unknown model 'nope'", id="unknown-model"),
    pytest.param("classifier", "9", "NOT_FOUND", "model 'classifier' has no version '9'; it has [1, 2]",
                 id="unknown-version"),
    pytest.param("classifier", "x" * 50, "NOT_FOUND", f"model 'classifier' has no version '{'x' * 38}",
                 id="bad-version"),
    pytest.param("tampered", "", "UNAVAILABLE", "model 'tampered' version 1 is not ready", id="not-ready"),
])
def test_model_errors(client: Any, server: tuple[str, str], model: str, version: str, code: str,
                      message: str) -> None:
    x = np.zeros((1, 4), np.float32)
    inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
        client.infer(model, [inp], model_version=version, headers=AUTH)
    assert _code(caught.value) == code
    assert caught.value.message().startswith(message)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    http = httpx.post(server[0] + path, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                                          "data": [0, 0, 0, 0]}]}, headers=AUTH, timeout=30)
    assert http.json()["error"] == caught.value.message()


def test_framing_mistakes(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="classifier", raw_input_contents=[b"\0" * 16, b"\0" * 16])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 raw_input_contents for 1 inputs" in caught.value.details()
    request = pb.ModelInferRequest(model_name="id_fp16")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16, which has no typed contents" in caught.value.details()


def test_message_over_the_body_limit(client: Any) -> None:
    x = np.zeros((ROWS_LIMIT, BODY_LIMIT // ROWS_LIMIT // 4 + 1), np.float32)  # just over BNFOLD_MAX_BODY_BYTES
    inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
        client.infer("classifier", [inp], headers=AUTH)
    assert _code(caught.value) == "RESOURCE_EXHAUSTED"
    assert str(BODY_LIMIT) in caught.value.message()


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": KEY}],
                         ids=["missing", "wrong", "no-bearer"])
def test_api_key(server: tuple[str, str], headers: dict[str, str] | None) -> None:
    triton = tritonclient_grpc.InferenceServerClient(server[1])
    inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
    calls = [lambda: triton.infer("classifier", [inp], headers=headers),
             lambda: triton.get_model_metadata("classifier", headers=headers),
             lambda: triton.is_model_ready("classifier", headers=headers),
             lambda: triton.get_server_metadata(headers=headers)]
    http = httpx.get(f"{server[0]}/v2", headers=headers, timeout=30)
    for call in calls:
        with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
            call()
        assert _code(caught.value) == "UNAUTHENTICATED"
        assert caught.value.message() == http.json()["error"]
        assert KEY not in caught.value.message()
    triton.close()


@pytest.mark.parametrize("method", ["ModelStatistics", "TraceSetting", "SystemSharedMemoryStatus"])
def test_unimplemented(stub: Any, method: str) -> None:
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as caught:
        call(getattr(pb, f"{method}Request")(), metadata=tuple(AUTH.items()), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == f"bnfold does not implement {method}"


def test_metrics_count_grpc_requests(client: Any, server: tuple[str, str]) -> None:
    def counts() -> tuple[float, float]:
        text = httpx.get(f"{server[0]}/metrics", headers=AUTH, timeout=30).text
        ok = [line for line in text.splitlines()
              if line.startswith('bnfold_requests_total{model="conv",outcome="success"}')]
        bad = [line for line in text.splitlines() if line.startswith('bnfold_grpc_errors_total{code="NOT_FOUND"}')]
        return (float(ok[0].split()[-1]) if ok else 0.0), (float(bad[0].split()[-1]) if bad else 0.0)

    before = counts()
    x = np.zeros((2, 3, 8, 8), np.float32)
    inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("conv", [inp], headers=AUTH)
    with pytest.raises(tritonclient_grpc.InferenceServerException):
        client.infer("nope", [inp], headers=AUTH)
    after = counts()
    assert after[0] - before[0] == 3
    assert after[1] - before[1] == 1


def test_repository_control_off(client: Any, server: tuple[str, str]) -> None:
    """With BNFOLD_MODEL_CONTROL unset the index answers and load/unload are refused as over HTTP."""
    index = client.get_model_repository_index(headers=AUTH)
    assert ("classifier", "2", "READY") in {(m.name, m.version, m.state) for m in index.models}
    for method in ("load", "unload"):
        with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
            getattr(client, f"{method}_model")("classifier", headers=AUTH)
        http = httpx.post(f"{server[0]}/v2/repository/models/classifier/{method}", headers=AUTH, timeout=30)
        assert (_code(caught.value), caught.value.message()) == ("PERMISSION_DENIED", http.json()["error"])
    with pytest.raises(tritonclient_grpc.InferenceServerException) as caught:
        client.get_model_repository_index()  # no key
    assert _code(caught.value) == "UNAUTHENTICATED"


def test_readme_tritonclient_example_over_grpc(tmp_path: Path) -> None:
    """The README's tritonclient example, switched to tritonclient.grpc and the gRPC port (nothing else
    changed), prints what the README says against ``python -m service`` serving the shipped digits model."""
    import re
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    repo_root = Path(__file__).resolve().parents[2]
    model = repo_root / "models" / "digits" / "1" / "model.onnx"
    if not model.is_file():
        pytest.skip("models/digits/1/model.onnx is not in this checkout")
    readme = (repo_root / "README.md").read_text()
    match = re.search(r"^```python\n(.*?)^```\n\n.*?```text\n(.*?)```", readme, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "README: no tritonclient example followed by its output"
    example, shown = match.groups()
    (tmp_path / "digits" / "1").mkdir(parents=True)
    (tmp_path / "digits" / "1" / "model.onnx").write_bytes(model.read_bytes())
    http_port, grpc_port = free_port(), free_port()
    code = example.replace("import tritonclient.http as httpclient", "import tritonclient.grpc as httpclient")
    code = code.replace('"localhost:8000"', repr(f"127.0.0.1:{grpc_port}"))
    assert code.count("tritonclient.grpc") == 1 and repr(f"127.0.0.1:{grpc_port}") in code  # only these changed
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(tmp_path), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1"}
    process = start(env)
    try:
        wait_until(process, lambda: is_ready(f"http://127.0.0.1:{http_port}"), "readiness")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    finally:
        stop(process)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == shown


def test_stream_infer(client: Any, grpc_repository: Path) -> None:
    """tritonclient's streaming API: every request answered in its response, an error in its own one."""
    import queue

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    xs = [np.random.default_rng(k).standard_normal((2, 4)).astype(np.float32) for k in range(5)]
    try:
        for k, x in enumerate(xs):
            inp = tritonclient_grpc.InferInput("input", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("classifier", [inp], request_id=str(k))
        bad = tritonclient_grpc.InferInput("input", [2, 4], "INT32")
        bad.set_data_from_numpy(np.zeros((2, 4), np.int32))
        client.async_stream_infer("classifier", [bad], request_id="bad")
        got = [answers.get(timeout=120) for _ in range(len(xs) + 1)]
    finally:
        client.stop_stream()
    runtime = ModelRuntime(grpc_repository / "classifier" / "2" / "model.onnx", threads=1)
    for k, (result, error) in enumerate(got[:-1]):
        assert error is None and result.get_response().id == str(k)
        np.testing.assert_array_equal(result.as_numpy("logits"), runtime.run({"input": xs[k]})[0])
    result, error = got[-1]
    assert result is None and "has datatype 'INT32', the model expects FP32" in error.message()
