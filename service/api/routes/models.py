"""Model metadata and model readiness, for the newest or a given version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from service.api.deps import ServiceDep, check_names
from service.api.errors import http_error, public
from service.api.schemas import ModelMetadata, ModelReady, TensorMetadata
from service.errors import ServiceError
from service.repository import ModelVersion

router = APIRouter(prefix="/v2/models", tags=["metadata"])


def _metadata(service: ServiceDep, name: str, version: str | None) -> ModelMetadata:
    try:
        check_names(service.repository, name, version)
        entry = service.repository.get(name, version)
    except ServiceError as exc:
        raise http_error(exc) from None
    runtime = entry.runtime
    return ModelMetadata(
        name=name, versions=[str(v) for v in service.repository.models[name]], platform="onnxruntime_onnx",
        inputs=[TensorMetadata(**s.metadata()) for s in runtime.inputs] if runtime else [],
        outputs=[TensorMetadata(**s.metadata()) for s in runtime.outputs] if runtime else [],
        version=str(entry.version), ready=entry.ready,
        reason=public((entry.stale if entry.ready else entry.reason) or "") or None,  # stale: see ModelVersion
        certificate=_certificate(entry),
        batching=entry.batching_summary(),
    )


def _certificate(entry: ModelVersion) -> dict[str, Any] | None:
    """The certificate summary, with what the file is: ``kind`` "float" or "int8" (and how it was quantized)."""
    summary = entry.certificate_summary()
    if summary is not None and entry.certificate is not None:
        summary["kind"] = entry.certificate.kind
        summary["quantized"] = entry.certificate.kind != "float"
        if entry.certificate.quantization is not None:
            summary["quantization"] = dict(entry.certificate.quantization)
    return summary


def _ready(service: ServiceDep, name: str, version: str | None) -> ModelReady:
    try:
        check_names(service.repository, name, version)
        entry: ModelVersion = service.repository.get(name, version)
    except ServiceError as exc:
        raise http_error(exc) from None
    if not entry.ready:
        raise HTTPException(503, public(f"model {name!r} version {entry.version} is not ready: {entry.reason}"))
    return ModelReady(name=name, version=str(entry.version), ready=True)


@router.get("/{name}")
async def model_metadata(name: str, service: ServiceDep) -> ModelMetadata:
    """Inputs, outputs, versions, readiness and certificate of the newest version."""
    return _metadata(service, name, None)


@router.get("/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, service: ServiceDep) -> ModelMetadata:
    """Inputs, outputs, versions, readiness and certificate of one version."""
    return _metadata(service, name, version)


@router.get("/{name}/ready", responses={503: {"description": "the version failed to load or its self-test"}})
async def model_ready(name: str, service: ServiceDep) -> ModelReady:
    """200 when the newest version serves."""
    return _ready(service, name, None)


@router.get("/{name}/versions/{version}/ready", responses={503: {"description": "not ready"}})
async def model_version_ready(name: str, version: str, service: ServiceDep) -> ModelReady:
    """200 when this version serves."""
    return _ready(service, name, version)
