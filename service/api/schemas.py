"""Response bodies of the metadata and health endpoints (inference bodies are encoded by the codec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool
    reason: str | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    # bnfold extensions: why a version does not serve, and what its certificate says.
    version: str
    ready: bool
    reason: str | None = None
    certificate: dict[str, Any] | None = None
    batching: dict[str, Any] | None = None  # enabled, reason, max_batch_size, max_queue_delay_ms


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: dict[str, float]


class Predictions(BaseModel):
    predictions: list[Prediction]
