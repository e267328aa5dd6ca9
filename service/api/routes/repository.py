"""The model repository extension (Triton's): index, load and unload (:mod:`service.control`).

Bodies are Triton's: index takes ``{"ready": bool}`` (optional; empty body = every model) and answers
``[{"name", "version", "state", "reason"}]`` (version and reason left out when empty); load takes
``{"parameters": {}}``, unload ``{"parameters": {"unload_dependents": bool}}`` (both optional; bnfold
has no ensembles, so there are no dependents) and they answer 200 with an empty body. Load and
unload need ``BNFOLD_MODEL_CONTROL=explicit`` (else 403).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request, Response

from service.api.body import read_body
from service.api.deps import ServiceDep
from service.api.errors import http_error
from service.errors import ServiceError

router = APIRouter(prefix="/v2/repository", tags=["repository"])

MAX_CONTROL_BODY_BYTES = 64 * 1024  # a control request is a few keys


async def _body(request: Request, allowed: dict[str, type]) -> dict[str, Any]:
    """The JSON object of the request (``{}`` for an empty body) whose keys and types are ``allowed``."""
    raw = await read_body(request.receive, request.headers.get("content-length", "").encode() or None,
                          request.headers.get("content-encoding", "").encode() or None, MAX_CONTROL_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, f"expected a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key not in allowed:
            raise HTTPException(400, f"unknown key {key[:40]!r}; expected {sorted(allowed)}")
        if not isinstance(value, allowed[key]):
            raise HTTPException(400, f"{key!r} must be {allowed[key].__name__}, got {type(value).__name__}")
    return body


def _parameters(body: dict[str, Any], allowed: dict[str, type]) -> None:
    """Refuse load/unload parameters bnfold does not have (Triton's ``config`` and ``file:`` overrides)."""
    for key, value in body.get("parameters", {}).items():
        if key not in allowed:
            raise HTTPException(400, f"parameter {str(key)[:40]!r} is not supported (bnfold loads models from its "
                                     f"repository as written); expected {sorted(allowed) or 'no parameters'}")
        if not isinstance(value, allowed[key]):
            raise HTTPException(400, f"parameter {key!r} must be {allowed[key].__name__}, got "
                                     f"{type(value).__name__}")


@router.post("/index", responses={400: {"description": "malformed request"}})
async def index(request: Request, service: ServiceDep) -> list[dict[str, str]]:
    """Every model in the repository with each version's state (READY, UNAVAILABLE, LOADING, UNLOADING)."""
    body = await _body(request, {"ready": bool, "repository_name": str})
    entries = service.control.index(ready_only=body.get("ready", False))
    return [{"name": e.name, **({"version": e.version} if e.version else {}), "state": e.state,
             **({"reason": e.reason} if e.reason else {})} for e in entries]


@router.post("/models/{name}/load", responses={400: {"description": "a version did not load"},
                                               403: {"description": "BNFOLD_MODEL_CONTROL is not explicit"},
                                               404: {"description": "no such model directory"}})
async def load(name: str, request: Request, service: ServiceDep) -> Response:
    """Load or reload a model from the repository; 400 names each version that did not load, and why."""
    _parameters(await _body(request, {"parameters": dict}), {})
    try:
        await service.control.load(name)
    except ServiceError as exc:
        raise http_error(exc) from None
    return Response(status_code=200)


@router.post("/models/{name}/unload", responses={403: {"description": "BNFOLD_MODEL_CONTROL is not explicit"},
                                                 404: {"description": "unknown model"}})
async def unload(name: str, request: Request, service: ServiceDep) -> Response:
    """Stop serving a model; answers once its in-flight requests have finished."""
    _parameters(await _body(request, {"parameters": dict}), {"unload_dependents": bool})
    try:
        await service.control.unload(name)
    except ServiceError as exc:
        raise http_error(exc) from None
    return Response(status_code=200)
