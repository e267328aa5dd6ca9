"""service.jsondata: a lifted body parses to what orjson gives, and a request decodes to what it did before.

Two properties, on named cases and on generated documents:
- :func:`jsondata.loads` returns ``None`` or orjson's parse of the body with each input's ``data``
  as a :class:`~service.jsondata.Numbers` (whose list is orjson's, and whose floats are that list in float64);
- a request decodes (arrays or error) exactly as with lifting turned off.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import codec, jsondata
from service.codec import Decoder, TensorSpec
from service.errors import ServiceError

INPUTS = [TensorSpec("x", "FP32", (-1, 4)), TensorSpec("h", "FP16", (-1,)), TensorSpec("d", "FP64", (-1,)),
          TensorSpec("i", "INT64", (-1,)), TensorSpec("u", "UINT64", (-1,))]
OUTPUTS = [TensorSpec("y", "FP32", (-1, 2))]
NUMBERS = ["0", "-0", "-0.0", "1", "-17", "0.5", "1e3", "1E-3", "2.5e+2", "-1.7976931348623157e308", "5e-324",
           "2.2250738585072014e-308", "1e-400", "0.30000000000000004", "123456789012345678", "9007199254740993",
           "18446744073709551615", "-9223372036854775808", "3.4028235e38", "3.5e38", "70000", "65504"]


@pytest.fixture(autouse=True, scope="module")
def _lift_every_array() -> Any:
    """Lift arrays of any length here (the service leaves those under ARRAY_BYTES to orjson), so that small
    cases exercise the lifting."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(jsondata, "ARRAY_BYTES", 0)
        yield


def _unlifted(value: Any) -> Any:
    """``value`` with every Numbers replaced by its list (what orjson gives)."""
    if isinstance(value, jsondata.Numbers):
        return value.value()
    if isinstance(value, dict):
        return {k: _unlifted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unlifted(v) for v in value]
    return value


def _check_loads(body: bytes) -> Any:
    """jsondata.loads(body), asserted to equal orjson's parse (floats equal to the list in float64)."""
    lifted = jsondata.loads(body)
    if lifted is None:
        return None
    assert _unlifted(lifted) == orjson.loads(body)
    for entry in lifted["inputs"]:
        numbers = entry.get("data") if isinstance(entry, dict) else None
        if isinstance(numbers, jsondata.Numbers) and numbers.floats is not None:
            want = np.array([float(v) for v in numbers.value()], np.float64)
            np.testing.assert_array_equal(numbers.floats, want, strict=True)
            assert np.array_equal(np.signbit(numbers.floats), np.signbit(want))
    return lifted


def _outcome(body: bytes, lift: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(jsondata, "LIFT_BYTES", 0 if lift else 1 << 62)
    try:
        request = Decoder(INPUTS, OUTPUTS, codec.Limits(max_json_bytes=1 << 24)).decode(body, None)
    except ServiceError as exc:
        return type(exc).__name__, str(exc)
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in request.inputs.items()}, request.id, request.outputs


def _assert_same_decode(body: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    lifted = _outcome(body, True, monkeypatch)
    assert lifted == _outcome(body, False, monkeypatch)
    return lifted


def _request(shapes: dict[str, list[int]] | None = None, **data: str) -> bytes:
    """A request with the named inputs' ``data`` as raw JSON text (the others get valid data)."""
    default = {"x": "[1, 2, 3, 4]", "h": "[0.5]", "d": "[2.5]", "i": "[7]", "u": "[8]"}
    shapes = {"x": [1, 4], "h": [1], "d": [1], "i": [1], "u": [1], **(shapes or {})}
    types = {spec.name: spec.datatype for spec in INPUTS}
    entries = [f'{{"name": "{name}", "datatype": "{types[name]}", "shape": {json.dumps(shapes[name])}, '
               f'"data": {data.get(name, text)}}}' for name, text in default.items()]
    return ('{"id": "r1", "inputs": [' + ", ".join(entries) + "]}").encode()


def test_a_large_float_body_is_lifted_and_decodes_to_the_same_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32)
    body = _request({"x": [64, 4]}, x=json.dumps(x.reshape(-1).tolist()))
    lifted = _check_loads(body)
    assert lifted is not None and all(isinstance(e["data"], jsondata.Numbers) for e in lifted["inputs"])
    arrays, request_id, _ = _assert_same_decode(body, monkeypatch)
    assert request_id == "r1" and arrays["x"] == ("<f4", (64, 4), x.tobytes())


@pytest.mark.parametrize("number", NUMBERS)
@pytest.mark.parametrize("name", ["x", "h", "d", "i", "u"])
def test_each_number_decodes_as_without_lifting(name: str, number: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"[{number}, {number}, 1, -2.5]" if name == "x" else f"[{number}]"
    body = _request(**{name: text})
    _check_loads(body)
    _assert_same_decode(body, monkeypatch)


WHITESPACE = {
    "none": '[1,2,3,4]',
    "spaces, tabs, newlines": '[ 1 ,\t2,\n3 ,\r\n4 ]',
}


@pytest.mark.parametrize("text", WHITESPACE.values(), ids=WHITESPACE.keys())
def test_json_whitespace_inside_the_array(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _request(x=text)
    assert _check_loads(body) is not None
    _assert_same_decode(body, monkeypatch)


def test_an_empty_array_for_a_zero_row_input(monkeypatch: pytest.MonkeyPatch) -> None:
    body = _request({"x": [0, 4]}, x="[]")
    assert _check_loads(body) is not None
    arrays, _, _ = _assert_same_decode(body, monkeypatch)
    assert arrays["x"] == ("<f4", (0, 4), b"")


# Bodies the lifting must leave to orjson (None), or lift without changing the outcome.
TRICKY = {
    "nested rows": _request(x="[[1, 2, 3, 4]]"),
    "nested as declared, two rows": _request({"x": [2, 4]}, x="[[1, 2, 3, 4], [5, 6, 7, 8]]"),
    "ragged rows": _request(x="[[1, 2], [3, 4, 5], []]"),
    "flattened as ragged would be": _request(x="[[1, 2], [], 3, 4]"),
    "strings": _request(x='["1", "2", "3", "4"]'),
    "a bracket inside a string": _request(x='[1, "]", 2, 3]'),
    "booleans": _request(x="[true, false, true, false]"),
    "booleans among floats": _request(x="[true, 1.5, 2, 3]"),
    "null": _request(x="[null, 1, 2, 3]"),
    "objects": _request(x='[{"a": 1}, 2, 3, 4]'),
    "NaN literal (not JSON)": _request(x="[NaN, 1, 2, 3]"),
    "trailing comma (not JSON)": _request(x="[1, 2, 3, 4,]"),
    "leading zero (not JSON)": _request(x="[01, 2, 3, 4]"),
    "plus sign (not JSON)": _request(x="[+1, 2, 3, 4]"),
    "bare dot (not JSON)": _request(x="[.5, 2, 3, 4]"),
    "integer past 64 bits": _request(x="[18446744073709551616, 2, 3, 4]"),
    "negative integer past 64 bits": _request(x="[-9223372036854775809, 2, 3, 4]"),
    "double overflow": _request(x="[1e400, 2, 3, 4]"),
    "too few numbers": _request(x="[1, 2, 3]"),
    "unterminated": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4',
    "data under parameters": _request().replace(b'"id": "r1"', b'"parameters": {"data": [1, 2]}, "id": "r1"'),
    "a key ending in an escaped quote and data": _request().replace(
        b'"id": "r1"', b'"id": "r1", "k\\"data": [5, 6]'),
    "data twice in one input": _request().replace(b'"data": [1, 2, 3, 4]',
                                                  b'"data": [9, 9, 9, 9], "data": [1, 2, 3, 4]'),
    "data as a string looking like a placeholder": _request(x='"bnfold-lifted-00000000000000000000000000000000:0"'),
    "data as a number": _request(x="5"),
    "inputs not a list": b'{"inputs": {"data": [1, 2, 3, 4]}}',
    # orjson's depth limit (1024) counts the whole body; lifted, the objects' depth would count apart
    "objects nested to orjson's depth limit": _request(x="[" + '{"a":' * 1021 + "1" + "}" * 1021 + ", 2, 3, 4]"),
    "the same, with an input error before it": _request(x="[" + '{"a":' * 1021 + "1" + "}" * 1021 + ", 2, 3, 4]"
                                                         ).replace(b'"name": "x"', b'"name": "zz"'),
    "an empty UINT64 input": _request({"u": [0]}, u="[]"),
    "not an object": b'[{"data": [1, 2]}]',
}


@pytest.mark.parametrize("body", TRICKY.values(), ids=TRICKY.keys())
def test_tricky_bodies_parse_and_decode_as_without_lifting(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        assert jsondata.loads(body) is None  # never a parse of what orjson refuses
    else:
        _check_loads(body)
    _assert_same_decode(body, monkeypatch)


def test_short_arrays_are_left_to_orjson_in_service() -> None:
    """Lifting an array of a few numbers costs more than orjson's list; the service lifts only long ones."""
    long, short = "[" + ", ".join(["0.25"] * 300) + "]", "[1, 2, 3, 4]"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(jsondata, "ARRAY_BYTES", 1024)
        lifted = _check_loads(_request({"d": [300]}, d=long, x=short))
    assert lifted is not None
    assert [type(entry["data"]) for entry in lifted["inputs"]] == [list, list, jsondata.Numbers, list, list]


ADVERSARIAL = {
    # each of these once made the search quadratic in the body or created one lifted array per tiny input
    "many unclosed data keys": b'"data":[' * 50_000 + b"]",
    "nested data keys, then a long string": b'{"data": [' * 500 + b'"' + b"a" * 200_000 + b'"' + b"]}" * 500,
    "many inputs with tiny arrays": b'{"inputs": [' + b",".join([b'{"data":[1]}'] * 20_000) + b"]}",
}


@pytest.mark.parametrize("body", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_bodies_are_given_up_on_after_linear_work(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search looks at no "data" twice, ends at the first nested array and after CANDIDATES keys; no
    simdjson parse starts for these."""
    searched: list[int] = []
    key = jsondata._KEY

    class Counting:
        def search(self, text: bytes, pos: int) -> Any:
            searched.append(pos)
            return key.search(text, pos)

    monkeypatch.setattr(jsondata, "_KEY", Counting())
    monkeypatch.setattr(jsondata, "_numbers", lambda text: pytest.fail("nothing here is lifted"))
    monkeypatch.setattr(jsondata, "ARRAY_BYTES", 1024)
    assert jsondata.loads(body) is None
    assert len(searched) <= jsondata.CANDIDATES and searched == sorted(set(searched))


def test_a_placeholder_cannot_be_forged_by_a_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is per process: a string the client sends in the placeholder's form stays a string."""
    token_form = json.dumps(jsondata._TOKEN + "0")
    body = _request(x="[1, 2, 3, 4]", h=f'{token_form}')
    lifted = jsondata.loads(body)
    assert lifted is None or not isinstance(lifted["inputs"][1]["data"], jsondata.Numbers)
    assert _assert_same_decode(body, monkeypatch) == _outcome(body, False, monkeypatch)


def test_a_lifted_value_is_read_only_once_and_the_parser_is_free_after_an_error() -> None:
    """simdjson refuses to reuse a parser while a document lives; a fresh one per array avoids that state."""
    for text in (b'[1, "a"]', b"[1, 2]", b"[1, 2"):
        jsondata._numbers(text)
    numbers = jsondata._numbers(b"[1, 2.5]")
    assert numbers is not None and numbers.floats is not None and numbers.floats.tolist() == [1.0, 2.5]


json_number = st.one_of(st.integers(-(1 << 65), 1 << 65), st.floats(allow_nan=False, allow_infinity=False))
json_scalar = st.one_of(json_number, st.booleans(), st.none(), st.text(max_size=6))


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4),
                     st.dictionaries(st.sampled_from(["data", "name", 'k"data', "x"]), inner, max_size=3))


json_value = st.recursive(json_scalar, _nested, max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["x", "h", "d", "i", "u", "z"]),
                                              "datatype": st.sampled_from(["FP32", "FP16", "FP64", "INT64", "UINT64"]),
                                              "shape": st.lists(st.integers(0, 4), max_size=2)},
                                             optional={"data": st.one_of(st.lists(json_number, max_size=8),
                                                                         json_value)}), max_size=3),
       extra=st.dictionaries(st.sampled_from(["id", "parameters", "outputs", "data"]), json_value, max_size=2),
       spacing=st.sampled_from([None, 2]))
def test_generated_requests_parse_and_decode_as_without_lifting(inputs: list[dict[str, Any]], extra: dict[str, Any],
                                                                spacing: int | None) -> None:
    body = json.dumps({"inputs": inputs, **extra}, indent=spacing).encode()
    _check_loads(body)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _assert_same_decode(body, monkeypatch)
