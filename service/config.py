"""Service settings: one pydantic-settings class, read from ``BNFOLD_*`` environment variables.

Batching and threading values must lie within :data:`BOUNDS` (threads: within the usable CPUs), so
a hostile or mistyped value is a start-up error naming the variable, the value and the bound, not a
batching thread that dies on the first request (``BNFOLD_MAX_QUEUE_DELAY_MS=inf``) or an onnxruntime
crash (``BNFOLD_INTRA_OP_THREADS=100000``). A model's ``config.json`` is checked against the same
bounds by :mod:`service.repository`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpu import usable_cpus

ENV_PREFIX = "BNFOLD_"
MAX_BATCH_SIZE = 4096  # rows in one coalesced onnxruntime run
MAX_QUEUE_DELAY_MS = 10_000  # 10 s: a longer wait to fill a batch is a mistake, not a batching policy
MAX_QUEUE_SIZE = 65_536  # queued requests per model
MAX_QUEUE_BYTES = 1 << 40  # queued input bytes per model (1 TiB: beyond that the limit means nothing)
BOUNDS: dict[str, tuple[int, int]] = {  # setting -> inclusive (low, high); also the config.json keys' bounds
    "max_batch_size": (1, MAX_BATCH_SIZE),
    "max_queue_delay_ms": (0, MAX_QUEUE_DELAY_MS),
    "max_queue_size": (1, MAX_QUEUE_SIZE),
    "max_queue_bytes": (1, MAX_QUEUE_BYTES),
}


def out_of_bounds(key: str, value: float) -> str | None:
    """Why ``value`` is not allowed for ``key`` of :data:`BOUNDS` (``None`` if it is): finite, within the bound."""
    low, high = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        return f"must be a finite number from {low} to {high}, got {value!r}"
    return None


def describe(error: ValidationError) -> str:
    """One line per bad setting, naming its ``BNFOLD_*`` variable, the value given and what is allowed."""
    lines = []
    for problem in error.errors():
        variable = ENV_PREFIX + ".".join(str(p) for p in problem.get("loc", ())).upper()
        message = str(problem.get("msg", "")).removeprefix("Value error, ")
        lines.append(message if message.startswith(variable) else f"{variable}={problem.get('input')!r}: {message}")
    return "\n".join(lines)


class Settings(BaseSettings):
    """Every knob of the service; ``BNFOLD_<NAME>`` in the environment overrides the default."""

    model_config = SettingsConfigDict(env_prefix="BNFOLD_", extra="ignore", protected_namespaces=())

    model_repository: Path = Path("models")  # DIR/<name>/<version>/model.onnx (+ optional DIR/<name>/config.json)
    host: str = "127.0.0.1"  # bind address; the container sets 0.0.0.0
    port: int = Field(default=8000, ge=0, le=65535)  # TCP port
    grpc_port: int | None = Field(default=None, ge=0, le=65535)  # gRPC (Open Inference Protocol) port; unset = off
    workers: int = Field(default=1, ge=1)  # uvicorn worker processes (each loads every model)
    api_key: SecretStr | None = None  # unset = open; set = inference/metadata need "Authorization: Bearer <key>"
    # Request limits (413 or 400 naming the setting; README "Limits" has the memory arithmetic behind them).
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)  # request body, also after gzip/deflate; else 413
    max_json_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)  # JSON part of a request (parsed, up to 40x); 413
    max_request_rows: int = Field(default=1024, ge=1)  # leading dimension of each input of one request; else 413
    max_tensor_elements: int = Field(default=4 * 1024 * 1024, ge=1)  # elements of one input tensor; else 413
    max_tensor_bytes: int = Field(default=16 * 1024 * 1024, ge=1)  # bytes of one input tensor in its datatype; else 413
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)  # held by running requests (per worker); 503
    # HTTP limits, enforced by service.protocol below the app (so before the API key check).
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)  # request line + headers; else 431
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # for request line + headers to arrive; else 408
    body_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # longest pause while a body arrives; else 408
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)  # deadline of one inference request; else 504
    max_connections: int = Field(default=512, ge=1)  # open connections + requests (uvicorn limit_concurrency); 503
    max_batch_size: int = 64  # most rows one coalesced onnxruntime run takes (per-model override)
    max_queue_delay_ms: float = 0.0  # extra wait to fill a batch, at most 10 s; 0 = take what is queued now
    max_queue_size: int = 256  # queued requests per model before 503 + Retry-After
    max_queue_bytes: int = 256 * 1024 * 1024  # queued input bytes per model before 503
    intra_op_threads: int = 0  # onnxruntime threads per model, <= usable CPUs; 0 = usable CPUs/(workers*models)
    ort_spinning: bool = False  # let onnxruntime threads busy-wait (faster alone, steals CPU from the event loop)
    retry_after_s: int = Field(default=1, ge=1)  # Retry-After seconds sent with 503 overload
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"  # also accepts upper case
    access_log: bool = False  # one JSON line per request (costs throughput)
    require_certificate: bool = False  # true = a model version without a bnfold certificate is not ready
    providers: str = "CPUExecutionProvider"  # onnxruntime execution providers, comma-separated, preferred first
    # Model control (README "Model control"): none = the repository as found at start-up; explicit = the
    # /v2/repository load and unload calls (one worker only); poll = follow the repository, each worker itself.
    model_control: Literal["none", "explicit", "poll"] = "none"
    repository_poll_s: float = Field(default=5.0, ge=0.05, le=3600)  # poll mode: seconds between scans

    @field_validator(*BOUNDS, mode="after")
    @classmethod
    def _bounded(cls, value: float, info: ValidationInfo) -> float:
        problem = out_of_bounds(str(info.field_name), value)
        if problem is not None:
            raise ValueError(f"{ENV_PREFIX}{str(info.field_name).upper()} {problem}")
        return value

    @field_validator("intra_op_threads", mode="after")
    @classmethod
    def _threads(cls, value: int) -> int:
        cpus = usable_cpus()
        if not 0 <= value <= cpus:
            raise ValueError(f"{ENV_PREFIX}INTRA_OP_THREADS must be from 0 (share the CPUs) to the {cpus} usable "
                             f"CPUs, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_worker_for_explicit(self) -> Settings:
        if self.model_control == "explicit" and self.workers > 1:
            raise ValueError(f"{ENV_PREFIX}MODEL_CONTROL=explicit needs {ENV_PREFIX}WORKERS=1, got "
                             f"{ENV_PREFIX}WORKERS={self.workers}: a load or unload call reaches one worker "
                             f"only, so the workers would serve different models; use "
                             f"{ENV_PREFIX}MODEL_CONTROL=poll (every worker follows the repository) or one worker")
        return self

    @field_validator("providers", mode="after")
    @classmethod
    def _providers(cls, value: str) -> str:
        from service.runtime import parse_providers

        return ",".join(parse_providers(value))  # ValueError names what is missing: a start-up error

    @property
    def provider_list(self) -> tuple[str, ...]:
        return tuple(self.providers.split(","))

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
