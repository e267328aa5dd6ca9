"""Open Inference Protocol inference, JSON or with the binary tensor data extension."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from service import inference
from service.api.deps import BodyDep, Service, ServiceDep
from service.api.errors import OUTCOME, http_error
from service.errors import ServiceError
from service.metrics import UNKNOWN_MODEL

router = APIRouter(prefix="/v2/models", tags=["inference"])

HEADER_LENGTH = "Inference-Header-Content-Length"
ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "malformed request or it does not fit the model"},
          404: {"description": "unknown model or version"}, 503: {"description": "not ready, or overloaded"}}
BODY_DOC = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}},
                                        "application/octet-stream": {}}}}


async def _infer(name: str, version: str | None, request: Request, body: bytes, service: Service) -> Response:
    start = time.perf_counter()
    label = name if name in service.repository.models else UNKNOWN_MODEL
    try:
        result = await inference.infer(service.repository, name, version, body, request.headers.get(HEADER_LENGTH))
    except ServiceError as exc:
        error = http_error(exc, service.settings.retry_after_s)
        service.metrics.request(label, OUTCOME.get(error.status_code, "error"))
        raise error from None
    service.metrics.request(label, "success", time.perf_counter() - start)
    if result.header_length is None:
        return Response(result.body, media_type="application/json")
    return Response(result.body, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(result.header_length)})


@router.post("/{name}/infer", responses=ERRORS, openapi_extra=BODY_DOC)
async def infer(name: str, request: Request, body: BodyDep, service: ServiceDep) -> Response:
    """Run inference on the newest version."""
    return await _infer(name, None, request, body, service)


@router.post("/{name}/versions/{version}/infer", responses=ERRORS, openapi_extra=BODY_DOC)
async def infer_version(name: str, version: str, request: Request, body: BodyDep, service: ServiceDep) -> Response:
    """Run inference on one version."""
    return await _infer(name, version, request, body, service)
