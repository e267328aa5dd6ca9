"""service.codec's Decoder: a remembered binary header decodes every later body exactly as a fresh decode does.

The request-level behaviour (every error's status and message through the app) is in
test_service_api.py; here the same header is decoded again and again with other bodies, and
each answer, array or error, must equal what :func:`decode_infer_request` gives from scratch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service import codec
from service.codec import Decoder, InferRequest, TensorSpec, decode_infer_request
from service.errors import ServiceError

INPUTS = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,)), TensorSpec("m", "BOOL", (-1,))]
OUTPUTS = [TensorSpec("y", "FP32", (-1, 2)), TensorSpec("z", "FP32", (-1,))]
LIMITS = codec.Limits(max_rows=8, max_elements=64, max_bytes=1024, max_json_bytes=4096)


def _header(rows: int = 2, extra: dict[str, Any] | None = None, sizes: tuple[int, int, int] | None = None) -> bytes:
    sizes = sizes or (rows * 8, rows * 8, rows)
    shapes = {"a": ("FP32", [rows, 2]), "b": ("INT64", [rows]), "m": ("BOOL", [rows])}
    header = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}
                         for (name, (datatype, shape)), size in zip(shapes.items(), sizes, strict=True)],
              **(extra or {})}
    return json.dumps(header).encode()


def _data(rng: np.random.Generator, rows: int = 2) -> bytes:
    return (rng.standard_normal((rows, 2)).astype("<f4").tobytes() + rng.integers(-9, 9, rows).astype("<i8").tobytes()
            + rng.integers(0, 2, rows).astype(np.uint8).tobytes())


def _outcome(decode: Any, body: bytes, length: int | None) -> Any:
    try:
        request: InferRequest = decode(body, length)
    except ServiceError as exc:
        return type(exc).__name__, str(exc)
    return ({k: (v.dtype.str, v.shape, v.tobytes()) for k, v in request.inputs.items()}, request.id, request.outputs,
            request.binary_outputs)


def _fresh(body: bytes, length: int | None) -> Any:
    return decode_infer_request(body, length, INPUTS, OUTPUTS, LIMITS)


HEADERS = {
    "plain": _header(),
    "with id and outputs": _header(extra={"id": "r7", "outputs": [{"name": "z", "parameters": {"binary_data": True}},
                                                                  {"name": "y"}]}),
    "binary outputs": _header(extra={"parameters": {"binary_data_output": True}}),
    "one row": _header(rows=1),
    "size says too much": _header(sizes=(16, 16, 3)),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_a_remembered_header_decodes_each_body_as_a_fresh_decode(name: str) -> None:
    header = HEADERS[name]
    rows = 1 if name == "one row" else 2
    decoder = Decoder(INPUTS, OUTPUTS, LIMITS)
    rng = np.random.default_rng(3)
    nan = bytearray(_data(rng, rows))
    nan[0:4] = np.float32(np.nan).tobytes()
    bodies = [_data(rng, rows), _data(rng, rows), bytes(nan), _data(rng, rows)[:-1], _data(rng, rows) + b"x",
              _data(rng, rows)[:5], _data(rng, rows)]
    outcomes = []
    for data in bodies * 2:  # the second pass decodes with every plan remembered
        body = header + data
        ours, fresh = _outcome(decoder.decode, body, len(header)), _outcome(_fresh, body, len(header))
        assert ours == fresh
        outcomes.append(ours)
    assert len(decoder._plans) == (0 if name == "size says too much" else 1)
    if name != "size says too much":
        assert outcomes[0] != outcomes[1]  # each body's own arrays, not the first one's
        assert isinstance(outcomes[2], tuple) and "not finite" in outcomes[2][1]  # checked per body
        assert "needs bytes" in outcomes[3][1] and "add up to" in outcomes[4][1]


def test_what_a_request_holds_is_its_own() -> None:
    header = HEADERS["with id and outputs"]
    decoder = Decoder(INPUTS, OUTPUTS, LIMITS)
    rng = np.random.default_rng(0)
    first = decoder.decode(header + _data(rng), len(header))
    first.binary_outputs.add("y")
    assert first.outputs is not None
    first.outputs.clear()
    first.inputs.clear()
    second = decoder.decode(header + _data(rng), len(header))
    assert second.outputs == ["z", "y"] and second.binary_outputs == {"z"} and set(second.inputs) == {"a", "b", "m"}


def test_headers_with_json_data_are_not_remembered_and_the_memory_is_bounded() -> None:
    decoder = Decoder(INPUTS, OUTPUTS, LIMITS)
    rng = np.random.default_rng(1)
    mixed = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]},
        {"name": "b", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}},
        {"name": "m", "datatype": "BOOL", "shape": [1], "data": [True]}]}).encode()
    body = mixed + np.int64(5).tobytes()
    assert _outcome(decoder.decode, body, len(mixed)) == _outcome(_fresh, body, len(mixed))
    assert decoder._plans == {}
    for i in range(codec.PLANS * 2 + 3):  # each header differs (its id): never more than PLANS remembered
        header = _header(extra={"id": f"request-{i}"})
        request = decoder.decode(header + _data(rng), len(header))
        assert request.id == f"request-{i}"
        assert len(decoder._plans) <= codec.PLANS
    long_header = _header(extra={"id": "x" * codec.PLAN_HEADER_BYTES})
    big = Decoder(INPUTS, OUTPUTS, codec.NO_LIMITS)
    assert big.decode(long_header + _data(rng), len(long_header)).id == "x" * codec.PLAN_HEADER_BYTES
    assert big._plans == {}


@pytest.mark.parametrize("header", [
    b'{"inputs": [{"name": "a", "datatype": "FP16", "shape": [2, 2], "parameters": {"binary_data_size": 16}}]}',
    b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [9, 2], "parameters": {"binary_data_size": 72}}]}',
    b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}]}',
    b'{"inputs": [{"name": "q", "datatype": "FP32", "shape": [2, 2]}]}',
    b'[1, 2]',
    b'{"inputs": [',
], ids=["datatype", "rows over the limit", "missing inputs", "unknown input", "not an object", "malformed"])
def test_a_header_that_fails_is_not_remembered_and_fails_again(header: bytes) -> None:
    decoder = Decoder(INPUTS, OUTPUTS, LIMITS)
    body = header + bytes(16)
    first = _outcome(decoder.decode, body, len(header))
    assert isinstance(first[0], str) and first == _outcome(decoder.decode, body, len(header))
    assert first == _outcome(_fresh, body, len(header))
    assert decoder._plans == {}


@pytest.mark.parametrize("length", [None, "binary"])
def test_inputs_come_in_the_models_order_whatever_order_the_request_lists_them(length: str | None) -> None:
    """So that equal requests get equal batching keys (service.batching groups by the feeds' names and shapes)."""
    rng = np.random.default_rng(2)
    decoder = Decoder(INPUTS, OUTPUTS, LIMITS)
    if length is None:
        body = json.dumps({"inputs": [
            {"name": "m", "datatype": "BOOL", "shape": [1], "data": [True]},
            {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]},
            {"name": "b", "datatype": "INT64", "shape": [1], "data": [4]}]}).encode()
        request = decoder.decode(body, None)
    else:
        header = json.dumps({"inputs": [
            {"name": "b", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}},
            {"name": "m", "datatype": "BOOL", "shape": [1], "parameters": {"binary_data_size": 1}},
            {"name": "a", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}).encode()
        a = rng.standard_normal((1, 2)).astype("<f4")
        for _ in range(2):  # fresh, then remembered
            request = decoder.decode(header + np.int64(4).tobytes() + b"\x01" + a.tobytes(), len(header))
            assert np.array_equal(request.inputs["a"], a)
    assert list(request.inputs) == ["a", "b", "m"]
    assert request.inputs["b"].tolist() == [4] and request.inputs["m"].tolist() == [True]


def test_binary_output_data_is_little_endian_c_order_whatever_the_array() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    want = values.astype("<f4").tobytes()
    for array in (values, values.astype(">f4"), np.asfortranarray(values), values.T.copy().T):
        assert codec._binary_data(array) == want
    assert codec._binary_data(np.array([True, False])) == b"\x01\x00"
