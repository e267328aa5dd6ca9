"""Per-request limits, the inference deadline, strict input and error hygiene, in-process.

Each limit is refused before anything is allocated for it, with 413 and a message naming the value
received, the limit and its ``BNFOLD_*`` setting. The HTTP-level limits (header size, read
timeouts, the byte budget) need a real server: ``test_service_http_limits.py``; memory under an
address-space limit: ``test_service_memory.py``.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from service_models import OPSET

from service.api import errors
from service.api.errors import public
from service.config import Settings
from service.main import create_app

INFER = "/v2/models/classifier/infer"


def body(shape: list[int], data: list[Any] | None = None, name: str = "input", datatype: str = "FP32") -> bytes:
    count = int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                   "data": [0] * count if data is None else data}]}).encode()


def binary(shape: list[int], raw: bytes, size: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    return str(response.json()["error"])


@pytest.fixture
def limited(repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=repository, intra_op_threads=1, max_request_rows=100,
                        max_tensor_elements=300, max_tensor_bytes=1000, max_json_bytes=4096)
    with TestClient(create_app(settings)) as client:
        yield client


# ---- request limits (issue 11, finding 1) ----------------------------------------------------

@pytest.mark.parametrize(("content", "headers", "message"), [
    pytest.param(body([101, 4]), {}, "input 'input' has 101 rows, over the limit of 100 rows per request "
                 "(BNFOLD_MAX_REQUEST_ROWS); split it into several requests", id="rows"),
    pytest.param(body([80, 4]), {}, "input 'input' with shape [80, 4] has 320 elements, over the limit of 300 "
                 "(BNFOLD_MAX_TENSOR_ELEMENTS)", id="elements"),
    pytest.param(body([70, 4]), {}, "input 'input' with shape [70, 4] needs 1120 bytes, over the limit of 1000 "
                 "(BNFOLD_MAX_TENSOR_BYTES)", id="bytes"),
    pytest.param(body([1, 4], [0.5] * 4).ljust(4097), {}, "the request's JSON has 4097 bytes, over the limit of "
                 "4096 (BNFOLD_MAX_JSON_BYTES); send large tensors as binary data", id="json-bytes"),
    pytest.param(*binary([10**12, 4], b"", 16 * 10**12), "input 'input' has 1000000000000 rows, over the limit of "
                 "100 rows per request (BNFOLD_MAX_REQUEST_ROWS); split it into several requests",
                 id="declared-shape-in-a-tiny-binary-body"),
    pytest.param(body([10**15, 4], []), {}, "input 'input' has 1000000000000000 rows, over the limit of 100 rows per "
                 "request (BNFOLD_MAX_REQUEST_ROWS); split it into several requests", id="declared-shape-with-no-data"),
])
def test_limits_are_checked_from_the_declared_shape(limited: TestClient, content: bytes, headers: dict[str, str],
                                                    message: str) -> None:
    assert error(limited.post(INFER, content=content, headers=headers), 413) == message


def test_predict_rows_are_checked_before_the_array_is_built(limited: TestClient) -> None:
    response = limited.post("/v1/models/classifier:predict", json={"instances": [[1, 2, 3, 4]] * 101})
    assert "has 101 rows, over the limit of 100 rows" in error(response, 413)


def test_a_request_at_every_limit_is_served(limited: TestClient) -> None:
    response = limited.post(INFER, content=body([62, 4], [0.5] * 248))  # 248 elements, 992 bytes, < 4096 of JSON
    assert response.status_code == 200, response.text


def test_default_limits_refuse_the_480000_row_gzip_body(client: TestClient) -> None:
    """The issue's request: 60 kB of gzip declaring 480,000 rows, 61 MB once inflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    packed = packer.compress(b'{"inputs":[{"name":"input","datatype":"FP32","shape":[480000,3,8,8],"data":[')
    packed += b"".join(packer.compress(b"0," * 1_000_000) for _ in range(92)) + packer.compress(b"0]}]}")
    packed += packer.flush()
    response = client.post("/v2/models/conv/infer", content=packed, headers={"Content-Encoding": "gzip"})
    assert error(response, 413) == "inflated request body exceeds the limit of 33554432 bytes (BNFOLD_MAX_BODY_BYTES)"


# ---- the deadline (finding 3) ----------------------------------------------------------------

def test_a_request_past_its_deadline_gets_504(repository: Path) -> None:
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    with TestClient(create_app(settings)) as client:
        entry = client.app.state.service.repository.get("classifier")  # type: ignore[attr-defined]
        release = threading.Event()
        original = entry.batcher._run

        def stuck(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            release.wait(60)
            return original(feeds)  # type: ignore[no-any-return]

        entry.batcher._run = stuck
        try:
            response = client.post(INFER, content=body([1, 4]))
        finally:
            release.set()
        assert error(response, 504) == "the request did not finish within 0.3 s (BNFOLD_REQUEST_TIMEOUT_S)"
        assert response.headers["connection"] == "close"
        entry.batcher._run = original
        assert client.post(INFER, content=body([1, 4])).status_code == 200
        assert 'bnfold_http_errors_total{status="504"} 1.0' in client.get("/metrics").text


# ---- strict input (finding 7) ----------------------------------------------------------------

@pytest.mark.parametrize(("path", "method"), [
    pytest.param("/v2/models/classifier/versions/{v}/infer", "post", id="infer"),
    pytest.param("/v2/models/classifier/versions/{v}", "get", id="metadata"),
    pytest.param("/v2/models/classifier/versions/{v}/ready", "get", id="ready"),
])
@pytest.mark.parametrize("version", [
    pytest.param("9" * 4301, id="4301-digits"), pytest.param("1" * 19, id="19-digits"),
    pytest.param("١", id="arabic-indic-one"), pytest.param("-1", id="negative"), pytest.param("1.0", id="float"),
])
def test_versions_that_are_not_plain_integers_are_404(client: TestClient, path: str, method: str,
                                                      version: str) -> None:
    url = path.format(v=version)
    response = client.post(url, content=body([1, 4])) if method == "post" else client.get(url)
    assert error(response, 404).startswith("model 'classifier' has no version ")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the cast that makes 1e300 inf in FP32
@pytest.mark.parametrize(("model", "content", "headers", "message"), [
    pytest.param("classifier", body([1, 4], [1e300, 0, 0, 0]), {}, "input 'input' data holds values in [0, 1e+300], "
                 "past the largest finite FP32 (3.40282e+38): they would be inf", id="fp32-overflow"),
    pytest.param("types", None, {}, "input 'in_FP16' data holds values in [-1e+10, 70000], past the largest finite "
                 "FP16 (65504): they would be inf", id="fp16-overflow"),
    pytest.param("classifier", *binary([1, 4], np.array([0, np.nan, np.inf, 1], np.float32).tobytes()),
                 "input 'input' binary data has 2 values that are not finite (inf or NaN)", id="binary-nan-and-inf"),
])
def test_non_finite_values_in_the_model_datatype_are_400(client: TestClient, model: str, content: bytes | None,
                                                         headers: dict[str, str], message: str) -> None:
    if content is None:  # every input of the types model, FP16 with values past 65504
        inputs = [{"name": f"in_{t}", "datatype": t, "shape": [1, 2], "data": [False, True] if t == "BOOL" else [1, 2]}
                  for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                            "FP16", "FP32", "FP64")]
        inputs[9]["data"] = [70000, -1e10]
        content = json.dumps({"inputs": inputs}).encode()
    assert message in error(client.post(f"/v2/models/{model}/infer", content=content, headers=headers), 400)


def test_large_finite_values_pass(client: TestClient) -> None:
    assert client.post(INFER, content=body([1, 4], [3.0e38, -3.0e38, 1e-45, 0])).status_code == 200


RAW = body([1, 4], [1, 2, 3, 4])
GZIP = gzip.compress(RAW)
DEFLATE = zlib.compress(RAW)


@pytest.mark.parametrize(("encoding", "content", "message"), [
    pytest.param("gzip", GZIP[:-8], "gzip body is truncated: it stops before the end of its compressed stream and its "
                 "CRC-32 trailer", id="gzip-without-crc-and-length"),
    pytest.param("gzip", GZIP[:-3], "gzip body is truncated", id="gzip-trailer-cut"),
    pytest.param("gzip", GZIP + b"garbage", "gzip body has 7 bytes after the end of its compressed stream",
                 id="gzip-trailing-garbage"),
    pytest.param("gzip", GZIP + GZIP, "gzip body has", id="gzip-second-member"),
    pytest.param("gzip", GZIP[:-8] + bytes([GZIP[-8] ^ 1]) + GZIP[-7:], "not valid gzip data", id="gzip-bad-crc"),
    pytest.param("deflate", DEFLATE[:-4], "deflate body is truncated", id="deflate-without-adler32"),
    pytest.param("deflate", DEFLATE + b"\x00", "deflate body has 1 bytes after", id="deflate-trailing-byte"),
])
def test_compressed_bodies_must_end_cleanly(client: TestClient, encoding: str, content: bytes, message: str) -> None:
    response = client.post(INFER, content=content, headers={"Content-Encoding": encoding})
    assert message in error(response, 400)


# ---- error hygiene (finding 7) ---------------------------------------------------------------

@pytest.mark.parametrize(("message", "shown"), [
    pytest.param("Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:84 "
                 "onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, "
                 "onnxruntime::TensorShapeVector&, bool) size != 0 was false. The input tensor cannot be reshaped",
                 "Status Message: size != 0 was false. The input tensor cannot be reshaped", id="onnxruntime-source"),
    pytest.param("Load model from /srv/models/x/1/model.onnx failed", "Load model from model.onnx failed",
                 id="server-path"),
    pytest.param("running Gather node. Name:'/layer1/Gather'", "running Gather node. Name:'/layer1/Gather'",
                 id="quoted-node-name-kept"),
    pytest.param("input 'x' has shape [1, 3]", "input 'x' has shape [1, 3]", id="no-path"),
])
def test_public_messages_have_no_paths(message: str, shown: str) -> None:
    assert public(message) == shown


def reshape_model() -> onnx.ModelProto:
    """x [N,3] -> Reshape to [-1, 2]: onnxruntime fails for an odd N with its source path in the message."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1, 2], np.int64), "s")])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def test_onnxruntime_errors_reach_the_client_without_source_paths(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reshape" / "1").mkdir(parents=True)
    (tmp_path / "reshape" / "1" / "model.onnx").write_bytes(reshape_model().SerializeToString())
    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(errors, "event", lambda level, message, **fields: logged.append(fields))
    with TestClient(create_app(Settings(model_repository=tmp_path, intra_op_threads=1))) as client:
        response = client.post("/v2/models/reshape/infer", content=body([1, 3], name="x"))
    message = error(response, 400)
    assert "cannot be reshaped" in message
    assert "onnxruntime_src" not in message and ".h:" not in message and "ReshapeHelper" not in message
    assert any("reshape_helper.h" in fields["error"] for fields in logged)  # the detail is in the log


@pytest.mark.parametrize("path", [pytest.param("/v2/models/corrupt/ready", id="ready"),
                                  pytest.param("/v2/models/corrupt/infer", id="infer"),
                                  pytest.param("/v2/models/corrupt", id="metadata")])
def test_not_ready_reasons_carry_no_server_paths(client: TestClient, repository: Path, path: str) -> None:
    response = client.post(path, content=RAW) if path.endswith("infer") else client.get(path)
    assert response.status_code in (200, 503), response.text
    assert str(repository) not in response.text and str(repository.resolve()) not in response.text
    assert "corrupt" in response.text


@pytest.mark.parametrize("path", [pytest.param("/v2/models/nope/infer", id="infer"),
                                  pytest.param("/v1/models/nope:predict", id="predict"),
                                  pytest.param("/v2/models/nope", id="metadata"),
                                  pytest.param("/v2/models/nope/ready", id="ready")])
def test_404_does_not_list_the_models(client: TestClient, path: str) -> None:
    response = client.post(path, content=RAW) if path.endswith(("infer", "predict")) else client.get(path)
    assert error(response, 404) == "unknown model 'nope'"


# ---- docs routes (finding 7) -----------------------------------------------------------------

def test_with_an_api_key_the_docs_are_off_and_the_schema_needs_the_key(repository: Path) -> None:
    key = "k3y"
    with TestClient(create_app(Settings(model_repository=repository, api_key=key, intra_op_threads=1))) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert error(client.get("/openapi.json"), 401).startswith("missing or wrong API key")
        schema = client.get("/openapi.json", headers={"Authorization": f"Bearer {key}"})
        assert schema.status_code == 200 and "/v2/models/{name}/infer" in schema.json()["paths"]


def test_without_an_api_key_the_docs_are_served(client: TestClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200, path


# ---- wiring --------------------------------------------------------------------------------------

def test_run_passes_the_http_limits_to_uvicorn(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import main
    from service.protocol import LimitedHttpToolsProtocol

    seen: dict[str, Any] = {}
    monkeypatch.setattr(main.uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    main.run(Settings(model_repository=repository, max_connections=7, max_header_bytes=2048, header_timeout_s=3,
                      body_timeout_s=4))
    assert seen["limit_concurrency"] == 7 and seen["timeout_keep_alive"] == main.KEEP_ALIVE_S
    factory = seen["http"]
    assert factory.func is LimitedHttpToolsProtocol
    assert (factory.keywords["limits"].max_header_bytes, factory.keywords["limits"].header_timeout_s,
            factory.keywords["limits"].body_timeout_s) == (2048, 3, 4)
