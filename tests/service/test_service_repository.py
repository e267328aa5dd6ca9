"""Model repository discovery, per-model config.json, and readiness reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from service_models import certified, gemm_model

from service.config import Settings
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import ServiceMetrics
from service.repository import ModelConfig, ModelRepository


def _load(root: Path, **settings: Any) -> ModelRepository:
    repository = ModelRepository(Settings(model_repository=root, intra_op_threads=1, **settings), ServiceMetrics())
    repository.load()
    return repository


def _save(root: Path, name: str, version: str, data: bytes) -> None:
    path = root / name / version / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_versions_and_newest(tmp_path: Path) -> None:
    for version in ("1", "10", "2"):
        _save(tmp_path, "m", version, gemm_model(int(version)).SerializeToString())
    (tmp_path / "m" / "latest").mkdir()  # not an integer: ignored
    repository = _load(tmp_path)
    try:
        assert list(repository.models["m"]) == [1, 2, 10]
        assert repository.get("m").version == 10
        assert repository.get("m", "2").version == 2
        assert repository.ready
        with pytest.raises(ModelNotFound, match=r"has no version '3'; it has \[1, 2, 10\]"):
            repository.get("m", "3")
        with pytest.raises(ModelNotFound, match="unknown model 'x'; this server has \\['m'\\]"):
            repository.get("x")
    finally:
        repository.close()


def test_missing_model_file_and_empty_repository(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    repository = _load(tmp_path)
    entry = repository.get("m")
    assert not entry.ready and "missing" in (entry.reason or "")
    with pytest.raises(ModelNotReady, match="version 1 is not ready: missing"):
        entry.serving()
    assert repository.loaded and not repository.ready


def test_certified_model_is_ready(tmp_path: Path) -> None:
    _save(tmp_path, "m", "1", certified(gemm_model(1), 1).SerializeToString())
    repository = _load(tmp_path)
    try:
        entry = repository.get("m")
        assert entry.ready and entry.selftest is not None and entry.selftest.passed
        assert entry.selftest.max_abs <= entry.selftest.allowed
    finally:
        repository.close()


def test_dynamic_batching_off(tmp_path: Path) -> None:
    _save(tmp_path, "m", "1", gemm_model(1).SerializeToString())
    (tmp_path / "m" / "config.json").write_text(json.dumps({"dynamic_batching": False, "intra_op_threads": 2}))
    repository = _load(tmp_path)
    try:
        runtime, batcher = repository.get("m").serving()
        assert runtime.batches and not batcher.batches and batcher.max_batch_size == 1
        assert runtime.threads == 2
    finally:
        repository.close()


def test_config_overrides(tmp_path: Path) -> None:
    _save(tmp_path, "m", "1", gemm_model(1).SerializeToString())
    (tmp_path / "m" / "config.json").write_text(json.dumps({"max_batch_size": 5, "max_queue_delay_ms": 3}))
    repository = _load(tmp_path, max_batch_size=64)
    try:
        _, batcher = repository.get("m").serving()
        assert (batcher.max_batch_size, batcher.max_queue_delay_s) == (5, 0.003)
    finally:
        repository.close()


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("{", "is not readable JSON", id="malformed"),
    pytest.param("[]", "must hold a JSON object, got list", id="not-object"),
    pytest.param('{"max_batch": 2}', "unknown keys ['max_batch']", id="unknown-key"),
    pytest.param('{"max_batch_size": 0}', "max_batch_size must be a positive integer, got 0", id="zero-batch"),
    pytest.param('{"max_batch_size": "8"}', "max_batch_size must be a positive integer, got '8'", id="string-batch"),
    pytest.param('{"intra_op_threads": 1.5}', "intra_op_threads must be a positive integer", id="float-threads"),
    pytest.param('{"max_queue_delay_ms": -1}', "max_queue_delay_ms must be a non-negative number", id="negative"),
    pytest.param('{"dynamic_batching": "on"}', "dynamic_batching must be true or false, got 'on'", id="not-bool"),
])
def test_bad_config(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.load(path)
    assert message in str(excinfo.value)


def test_malformed_certificate_is_not_ready(tmp_path: Path) -> None:
    model = gemm_model(1)
    entry = model.metadata_props.add()
    entry.key, entry.value = "bnfold.certificate", "{not json"
    _save(tmp_path, "m", "1", model.SerializeToString())
    repository = _load(tmp_path)
    assert "malformed bnfold certificate" in (repository.get("m").reason or "")
