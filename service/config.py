"""Service settings: one pydantic-settings class, read from ``BNFOLD_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; ``BNFOLD_<NAME>`` in the environment overrides the default."""

    model_config = SettingsConfigDict(env_prefix="BNFOLD_", extra="ignore", protected_namespaces=())

    model_repository: Path = Path("models")  # DIR/<name>/<version>/model.onnx (+ optional DIR/<name>/config.json)
    host: str = "127.0.0.1"  # bind address; the container sets 0.0.0.0
    port: int = Field(default=8000, ge=0, le=65535)  # TCP port
    workers: int = Field(default=1, ge=1)  # uvicorn worker processes (each loads every model)
    api_key: SecretStr | None = None  # unset = open; set = inference/metadata need "Authorization: Bearer <key>"
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    max_batch_size: int = Field(default=64, ge=1)  # most rows one coalesced onnxruntime run takes (per-model override)
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0)  # extra wait to fill a batch; 0 = take what is queued now
    max_queue_size: int = Field(default=256, ge=1)  # queued requests per model before 503 + Retry-After
    max_queue_bytes: int = Field(default=256 * 1024 * 1024, ge=1)  # queued input bytes per model before 503
    intra_op_threads: int = Field(default=0, ge=0)  # onnxruntime threads per model; 0 = usable CPUs/(workers*models)
    ort_spinning: bool = False  # let onnxruntime threads busy-wait (faster alone, steals CPU from the event loop)
    retry_after_s: int = Field(default=1, ge=1)  # Retry-After seconds sent with 503 overload
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"  # also accepts upper case
    access_log: bool = False  # one JSON line per request (costs throughput)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
