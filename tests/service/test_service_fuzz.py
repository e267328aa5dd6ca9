"""Hypothesis-generated malformed bodies and headers: never a 5xx, always an error body, server stays up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.main import create_app

PATHS = ["/v2/models/classifier/infer", "/v2/models/types/infer", "/v2/models/conv/infer",
         "/v1/models/classifier:predict", "/v2/models/static/infer"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30)
names = st.sampled_from(["input", "in_FP32", "in_BOOL", "in_INT8", "logits", "x", ""])
datatypes = st.sampled_from(["FP32", "FP16", "FP64", "INT8", "UINT64", "BOOL", "BYTES", "fp32", ""]) | json_values
shapes = st.lists(st.integers(-2, 5), max_size=5) | json_values
tensor = st.fixed_dictionaries({"name": names, "datatype": datatypes, "shape": shapes},
                               optional={"data": json_values | st.lists(st.floats(), max_size=20),
                                         "parameters": st.dictionaries(
                                             st.sampled_from(["binary_data_size", "binary_data"]),
                                             st.integers(-5, 64) | json_values, max_size=2)})
requests = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(tensor, max_size=3) | json_values, "outputs": json_values | st.lists(
        st.fixed_dictionaries({"name": names}, optional={"parameters": json_values}), max_size=2),
    "id": json_values, "parameters": json_values, "instances": json_values})


@pytest.fixture(scope="module")
def fuzz_client(repository: Path) -> Iterator[TestClient]:
    app = create_app(Settings(model_repository=repository, intra_op_threads=1, max_body_bytes=4096,
                              log_level="critical"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _check(client: TestClient, response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str)
    assert client.get("/v2/health/live").status_code == 200


@FUZZ
@given(path=st.sampled_from(PATHS), body=requests)
def test_structured_bodies(fuzz_client: TestClient, path: str, body: dict[str, Any]) -> None:
    _check(fuzz_client, fuzz_client.post(path, content=json.dumps(body).encode()))


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=600), header=st.none() | st.text(max_size=8)
       | st.integers(-10, 700).map(str), encoding=st.none() | st.sampled_from(["gzip", "deflate", "br", " GZIP"]))
def test_raw_bytes_and_framing_header(fuzz_client: TestClient, path: str, body: bytes, header: str | None,
                                      encoding: str | None) -> None:
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    try:
        response = fuzz_client.post(path, content=body, headers=headers)
    except UnicodeEncodeError:  # httpx refuses to send non-ASCII header text; nothing reached the server
        return
    _check(fuzz_client, response)


@FUZZ
@given(datatype=st.sampled_from(["FP32", "FP16", "INT8", "BOOL", "UINT64"]), shape=st.lists(st.integers(0, 4),
       max_size=3), size=st.integers(-3, 80), blob=st.binary(max_size=80))
def test_binary_tensors(fuzz_client: TestClient, datatype: str, shape: list[int], size: int, blob: bytes) -> None:
    head = json.dumps({"inputs": [{"name": f"in_{datatype}", "datatype": datatype, "shape": shape,
                                   "parameters": {"binary_data_size": size}}]}).encode()
    response = fuzz_client.post("/v2/models/types/infer", content=head + blob,
                                headers={"Inference-Header-Content-Length": str(len(head))})
    _check(fuzz_client, response)
