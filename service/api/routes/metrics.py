"""Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import ServiceDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Request counts and latency, queue time, batch size and model readiness."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
