"""One bad model version never takes the others down; origin checks refuse with a reason.

Every failure while a version loads (hostile certificate, hostile config.json, a bug) makes only that
version not ready, with a reason that names no server path; ``BNFOLD_REQUIRE_CERTIFICATE`` refuses
uncertified models and a ``sha256`` in config.json pins the approved file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from server_process import free_port, is_ready, start, stop, wait_until
from service_models import certified, gemm_model

from bnfold.certificate import METADATA_KEY
from service import independence
from service.config import Settings
from service.main import create_app
from service.metrics import ServiceMetrics
from service.repository import ModelRepository

DEADLINE_S = 60.0
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _save(root: Path, name: str, model: onnx.ModelProto | bytes, version: int = 1,
          config: dict[str, Any] | str | None = None) -> Path:
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if config is not None:
        (root / name / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _load(root: Path, **settings: Any) -> ModelRepository:
    repository = ModelRepository(Settings(model_repository=root, intra_op_threads=1, **settings), ServiceMetrics())
    repository.load()
    return repository


def _bomb(raw_bytes: int) -> str:
    """A valid .npy header announcing ``raw_bytes`` uint8 zeros, then the zeros: zlib ~1000:1, base64."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (raw_bytes,)})
    packer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [packer.compress(buf.getvalue()), *(packer.compress(chunk) for _ in range(raw_bytes >> 20))]
    return base64.b64encode(b"".join([*parts, packer.flush()])).decode("ascii")


def _with_certificate(edit: Callable[[dict[str, Any]], str]) -> onnx.ModelProto:
    """A certified Gemm model whose certificate text is ``edit(certificate as a dict)``."""
    model = certified(gemm_model(1), 1)
    (entry,) = [p for p in model.metadata_props if p.key == METADATA_KEY]
    entry.value = edit(json.loads(entry.value))
    return model


def _replace(body: dict[str, Any], old: str, new: str) -> str:
    text = json.dumps(body)
    assert old in text
    return text.replace(old, new)


def _deep(body: dict[str, Any]) -> str:
    return json.dumps(body)[:-1] + ', "errors": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"


def _bombed(body: dict[str, Any]) -> str:
    body["selftest"]["input"] = _bomb(256 << 20)  # 256 MiB once inflated
    return json.dumps(body)


BAD_CERTIFICATES = [
    pytest.param(lambda b: _replace(b, '"folded": 1', '"folded": 1e400'), "folded must be an integer", id="1e400"),
    pytest.param(_deep, "nests deeper than 16 levels", id="deep-nesting"),
    pytest.param(_bombed, "decompresses to more than 67108864 bytes", id="zlib-bomb"),
    pytest.param(lambda b: _replace(b, '"atol": 1e-05', '"atol": 1e400'), "atol must be a finite number",
                 id="infinite-tolerance"),
    pytest.param(lambda b: _replace(b, '"atol": 1e-05', '"atol": NaN'), "atol must be a finite number",
                 id="nan-tolerance"),
    pytest.param(lambda b: "{not json", "not valid JSON", id="not-json"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CERTIFICATES)
def test_bad_certificate_makes_only_its_version_not_ready(tmp_path: Path, edit: Callable[[dict[str, Any]], str],
                                                          message: str) -> None:
    _save(tmp_path, "bad", _with_certificate(edit))
    _save(tmp_path, "good", certified(gemm_model(1), 1))
    repository = _load(tmp_path)
    try:
        bad = repository.get("bad")
        assert not bad.ready and (bad.reason or "").startswith("malformed bnfold certificate: ")
        assert message in (bad.reason or "")
        assert repository.ready and repository.get("good").ready
        _, batcher = repository.get("good").serving()
        out = asyncio.run(asyncio.wait_for(batcher.submit({"input": np.ones((1, 4), np.float32)}), DEADLINE_S))
        assert out[0].shape == (1, 3)
    finally:
        repository.close()


def test_any_exception_while_loading_is_that_versions_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a bug (the probe is documented never to raise) fails one version, not the start-up."""
    _save(tmp_path, "a_first", gemm_model(1))
    _save(tmp_path, "b_second", gemm_model(2))
    real_probe, calls = independence.probe, []

    def buggy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug in the probe")
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(independence, "probe", buggy)
    repository = _load(tmp_path)
    try:
        first = repository.get("a_first")
        assert not first.ready and first.reason == "failed to load: ZeroDivisionError: a bug in the probe"
        assert first.batcher is None and first.runtime is None
        assert repository.get("b_second").ready
    finally:
        repository.close()


def test_reasons_reach_http_clients_without_server_paths(tmp_path: Path) -> None:
    _save(tmp_path, "good", certified(gemm_model(1), 1))
    _save(tmp_path, "bomb", _with_certificate(_bombed))
    _save(tmp_path, "corrupt", b"this is not an onnx model")
    (tmp_path / "missing" / "1").mkdir(parents=True)
    _save(tmp_path, "badconfig", gemm_model(2), config='{"max_queue_delay_ms": Infinity}')
    _save(tmp_path, "inf_errors", _with_certificate(lambda b: json.dumps({**b, "errors": {"max_rel": float("inf")}})))
    with TestClient(create_app(Settings(model_repository=tmp_path, intra_op_threads=1))) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/v2/models/good/infer", json=BODY).status_code == 200
        expected = {"bomb": "decompresses to more than", "corrupt": "failed to load: InvalidProtobuf",
                    "missing": "missing missing/1/model.onnx", "badconfig": "config.json is not readable JSON"}
        for name, reason in expected.items():
            metadata = client.get(f"/v2/models/{name}")
            assert metadata.status_code == 200 and metadata.json()["ready"] is False
            assert reason in metadata.json()["reason"], metadata.json()["reason"]
            ready = client.get(f"/v2/models/{name}/ready")
            assert ready.status_code == 503 and reason in ready.json()["error"]
            infer = client.post(f"/v2/models/{name}/infer", json=BODY)
            assert infer.status_code == 503 and reason in infer.json()["error"]
            for response in (metadata, ready, infer):
                assert str(tmp_path) not in response.text
        # a certificate may record an infinite error; the metadata endpoint still answers JSON
        certificate = client.get("/v2/models/inf_errors").json()["certificate"]
        assert certificate["errors"] == {"max_rel": "inf"}


def test_require_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, "certified", certified(gemm_model(1), 1))
    _save(tmp_path, "plain", gemm_model(2))
    monkeypatch.setenv("BNFOLD_REQUIRE_CERTIFICATE", "true")
    assert Settings().require_certificate is True
    repository = _load(tmp_path, require_certificate=True)
    try:
        assert repository.get("certified").ready
        plain = repository.get("plain")
        assert not plain.ready
        assert plain.reason == "the model has no bnfold certificate, and BNFOLD_REQUIRE_CERTIFICATE=true refuses it"
    finally:
        repository.close()
    relaxed = _load(tmp_path, require_certificate=False)
    try:
        assert relaxed.get("plain").ready
    finally:
        relaxed.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_pin_matches(tmp_path: Path) -> None:
    path = _save(tmp_path, "m", gemm_model(1))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"sha256": _digest(path).upper()}))
    repository = _load(tmp_path)
    try:
        assert repository.get("m").ready
    finally:
        repository.close()


def test_sha256_pin_mismatch_names_both_digests_and_no_path(tmp_path: Path) -> None:
    approved = hashlib.sha256(b"the file the operator approved").hexdigest()
    path = _save(tmp_path, "m", gemm_model(1), config={"sha256": approved})
    repository = _load(tmp_path)
    try:
        entry = repository.get("m")
        assert not entry.ready
        assert entry.reason == f"m/1/model.onnx has sha256 {_digest(path)}, but config.json pins sha256 {approved}"
        assert str(tmp_path) not in entry.reason
    finally:
        repository.close()


def test_sha256_pin_per_version(tmp_path: Path) -> None:
    one = _save(tmp_path, "m", gemm_model(1), version=1)
    _save(tmp_path, "m", gemm_model(2), version=2)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"sha256": {"1": _digest(one)}}))
    repository = _load(tmp_path)
    try:
        assert repository.get("m", "1").ready
        two = repository.get("m", "2")
        assert not two.ready and two.reason == "config.json pins sha256 for versions [1] only, not version 2"
    finally:
        repository.close()


@pytest.mark.parametrize(("pin", "message"), [
    pytest.param("abc", "sha256 for every version must be 64 hexadecimal digits, got 'abc'", id="short"),
    pytest.param(5, "must be 64 hexadecimal digits, got 5", id="number"),
    pytest.param({"latest": "0" * 64}, "sha256 maps version numbers to digests, got key 'latest'", id="bad-version"),
    pytest.param({"1": "z" * 64}, "sha256 for 1 must be 64 hexadecimal digits", id="not-hex"),
])
def test_malformed_sha256_pin_is_a_config_error(tmp_path: Path, pin: Any, message: str) -> None:
    _save(tmp_path, "m", gemm_model(1), config={"sha256": pin})
    repository = _load(tmp_path)
    entry = repository.get("m")
    assert not entry.ready and message in (entry.reason or "")


@pytest.mark.parametrize(("text", "message"), [
    pytest.param('{"intra_op_threads": 1e400}', "intra_op_threads must be a positive integer, got inf", id="1e400"),
    pytest.param('{"max_batch_size": ' + "9" * 5000 + "}", "is not readable JSON", id="huge-integer"),
    pytest.param('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "is not readable JSON", id="deep-nesting"),
    pytest.param(" " * 70_000 + "{}", "larger than 65536 bytes", id="too-large"),
    pytest.param(b"\xff\xfe{}", "is not readable JSON", id="not-utf8"),
])
def test_hostile_config_json_makes_only_that_model_not_ready(tmp_path: Path, text: str | bytes,
                                                              message: str) -> None:
    _save(tmp_path, "bad", gemm_model(1))
    config = tmp_path / "bad" / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    _save(tmp_path, "good", gemm_model(2))
    repository = _load(tmp_path)
    try:
        assert message in (repository.get("bad").reason or "")
        assert repository.get("good").ready
    finally:
        repository.close()


def test_config_threads_above_the_usable_cpus_are_clamped(tmp_path: Path) -> None:
    from service.cpu import usable_cpus

    _save(tmp_path, "m", gemm_model(1), config={"intra_op_threads": 100_000})
    repository = _load(tmp_path)
    try:
        runtime, _ = repository.get("m").serving()
        assert runtime.threads == usable_cpus()
    finally:
        repository.close()


@pytest.mark.slow
def test_real_server_starts_and_serves_despite_hostile_models(tmp_path: Path) -> None:
    """The findings end to end in a real process: no start-up failure, no segfault, good models serve."""
    _save(tmp_path, "good", certified(gemm_model(1), 1))
    _save(tmp_path, "threads", gemm_model(2), config={"intra_op_threads": 100_000})
    _save(tmp_path, "delay", gemm_model(3), config='{"max_queue_delay_ms": 1e300}')
    _save(tmp_path, "infinity", gemm_model(3), config='{"max_queue_delay_ms": Infinity}')
    for index, case in enumerate(BAD_CERTIFICATES[:3]):  # 1e400, deep nesting, zlib bomb
        _save(tmp_path, f"cert_{index}", _with_certificate(case.values[0]))  # type: ignore[arg-type]
    port = free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(tmp_path), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1"}
    env.pop("BNFOLD_MAX_QUEUE_DELAY_MS", None)
    process = start(env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(process, lambda: is_ready(url), "readiness")
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            for name in ("good", "threads"):
                response = client.post(f"/v2/models/{name}/infer", json=BODY)
                assert response.status_code == 200, response.text
            expected = {"delay": "max_queue_delay_ms must be a non-negative number, got 1e+300",
                        "infinity": "Infinity is not a number JSON allows",
                        "cert_0": "folded must be an integer", "cert_1": "nests deeper than 16 levels",
                        "cert_2": "decompresses to more than"}
            for name, reason in expected.items():
                ready = client.get(f"/v2/models/{name}/ready")
                assert ready.status_code == 503 and reason in ready.json()["error"], (name, ready.text)
        assert process.poll() is None
    finally:
        stop(process)
