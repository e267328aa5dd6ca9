"""Liveness and readiness probes (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from service.api.deps import ServiceDep
from service.api.schemas import Live, Ready

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get("/live")
async def live() -> Live:
    """The process answers HTTP."""
    return Live(live=True)


@router.get("/ready", responses={503: {"description": "still loading, or no model version serves"}})
async def ready(service: ServiceDep) -> Ready:
    """Start-up finished and at least one model version serves."""
    repository = service.repository
    if not repository.ready:
        raise HTTPException(503, "not ready: " + ("no model version serves" if repository.loaded else "loading"))
    return Ready(ready=True)
