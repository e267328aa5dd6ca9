"""Certificate parsing is bounded: hostile metadata is a ValueError with a reason, never a crash or a bomb."""

from __future__ import annotations

import base64
import io
import json
import zlib
from typing import Any

import numpy as np
import pytest

from bnfold import certificate
from bnfold.certificate import Certificate, decode_array, encode_array


def _body(**changes: Any) -> dict[str, Any]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = json.loads(Certificate(input_name="input", output_name="logits", selftest_input=x,
                                  selftest_output=x[:, :3], folded=2).to_json())
    body.update(changes)
    return body


def _bomb(raw_bytes: int) -> str:
    """A valid .npy of ``raw_bytes`` zero bytes, zlib-compressed (about 1000:1) and base64-encoded."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (raw_bytes,)})
    header = buf.getvalue()
    packer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [packer.compress(header)]
    parts += [packer.compress(chunk) for _ in range(raw_bytes >> 20)]
    return base64.b64encode(b"".join([*parts, packer.flush()])).decode("ascii")


def test_round_trip_within_bounds() -> None:
    cert = Certificate.from_json(json.dumps(_body()))
    assert cert.folded == 2 and cert.tolerance.atol == 1e-5
    np.testing.assert_array_equal(cert.selftest_input, np.arange(8, dtype=np.float32).reshape(2, 4))


@pytest.mark.parametrize(("text", "message"), [
    pytest.param(json.dumps(_body()).replace('"folded": 2', '"folded": 1e400'), "folded must be an integer",
                 id="1e400"),
    pytest.param(json.dumps(_body(kept=-1)), "kept must be an integer from 0 to 1000000, got -1", id="negative"),
    pytest.param(json.dumps(_body(kept=True)), "kept must be an integer", id="bool"),
    pytest.param(json.dumps(_body(folded=2.0)), "folded must be an integer", id="float-count"),
    pytest.param(json.dumps(_body(opset=10**7)), "opset must be an integer from 0 to 1000000", id="huge-opset"),
    pytest.param(json.dumps(_body(input_shape=[8, "x"])), "input_shape entry must be an integer", id="shape"),
    pytest.param(json.dumps(_body(tolerance={"atol": float("inf"), "rtol": 0})), "atol must be a finite number",
                 id="inf-atol"),
    pytest.param(json.dumps(_body()).replace('"rtol": 0.0001', '"rtol": 1e400'), "rtol must be a finite number",
                 id="1e400-rtol"),
    pytest.param(json.dumps(_body(tolerance={"atol": float("nan"), "rtol": 0})), "atol must be a finite number",
                 id="nan-atol"),
    pytest.param(json.dumps(_body(tolerance={"atol": -1, "rtol": 0})), "atol must be a finite number >= 0",
                 id="negative-atol"),
    pytest.param('{"errors":' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than 16 levels",
                 id="deep-recursion"),
    pytest.param(json.dumps(_body(errors={"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]})), "nests deeper than 16",
                 id="deep-below-recursion"),
    pytest.param('{"folded": ' + "9" * 5000 + "}", "not valid JSON", id="huge-integer"),
])
def test_hostile_fields_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        Certificate.from_json(text)
    assert message in str(excinfo.value)


def test_text_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(certificate, "MAX_TEXT_CHARS", 100)
    with pytest.raises(ValueError, match="more than the 100 allowed"):
        Certificate.from_json(json.dumps(_body()))


def test_number_of_values_is_bounded() -> None:
    body = _body(errors={"many": [0.5] * (certificate.MAX_ITEMS + 1)})  # ~4 MB of text, ~40 MB parsed
    with pytest.raises(ValueError, match="more than 1000000 JSON values"):
        Certificate.from_json(json.dumps(body))


def test_zlib_bomb_is_refused_before_it_inflates() -> None:
    bomb = _bomb(256 << 20)  # 256 MiB of zeros in about 256 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(ValueError, match=f"decompresses to more than {certificate.MAX_ARRAY_BYTES} bytes"):
        decode_array(bomb)
    body = _body()
    body["selftest"]["input"] = bomb
    with pytest.raises(ValueError, match="decompresses to more than"):
        Certificate.from_json(json.dumps(body))


def test_array_limits() -> None:
    x = np.ones((4, 4), np.float64)
    np.testing.assert_array_equal(decode_array(encode_array(x), max_bytes=1024), x)
    with pytest.raises(ValueError, match="decompresses to more than 100 bytes"):
        decode_array(encode_array(x), max_bytes=100)  # 128 data bytes + the .npy header
    truncated = base64.b64encode(base64.b64decode(encode_array(x))[:-4]).decode()
    with pytest.raises(ValueError, match="truncated"):
        decode_array(truncated)
    with pytest.raises(ValueError, match="must be a string"):
        decode_array(5)  # type: ignore[arg-type]
