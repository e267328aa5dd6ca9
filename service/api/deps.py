"""Dependencies declared once and injected: app state and the API key check.

All are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, which would cost a
thread hop per dependency per request. :func:`check_api_key` is the one key check, shared with the
inference endpoints (:mod:`service.api.fastpath`), which do not go through FastAPI's dependencies.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.control import ModelControl
from service.errors import ModelNotFound
from service.metrics import ServiceMetrics
from service.repository import ModelRepository


@dataclass(frozen=True)
class Service:
    """What the routes need, built once per app (one dependency instead of three keeps requests cheap)."""

    settings: Settings
    repository: ModelRepository
    metrics: ServiceMetrics
    control: ModelControl  # index, load, unload, polling (service.control)


async def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]


def check_api_key(settings: Settings, authorization: bytes) -> None:
    """With ``BNFOLD_API_KEY`` set, demand ``authorization == b"Bearer <key>"`` (constant-time comparison).

    ``authorization`` is the raw header value (latin-1 bytes as on the wire), ``b""`` when absent.
    Raises a 401 :class:`HTTPException` with ``WWW-Authenticate: Bearer``.
    """
    api_key = settings.api_key
    if api_key is None:
        return
    expected = b"Bearer " + api_key.get_secret_value().encode()
    if not hmac.compare_digest(authorization, expected):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})


def check_names(repository: ModelRepository, name: str, version: str | None) -> None:
    """404 (:class:`ModelNotFound`) for an unknown model, or a version that is not a plain integer.

    Before :meth:`ModelRepository.get`, for clients: the message does not list the other models,
    and a version of thousands of digits never reaches ``int()`` (whose digit limit raises).
    """
    if name not in repository.models:
        raise ModelNotFound(f"unknown model {name!r:.100}")
    if version is not None and not (version.isascii() and version.isdigit() and len(version) <= 18):
        raise ModelNotFound(f"model {name!r:.100} has no version {version!r:.40}")


async def require_api_key(request: Request, service: ServiceDep) -> None:
    """:func:`check_api_key` on the request's ``Authorization`` header."""
    check_api_key(service.settings, request.headers.get("authorization", "").encode("latin-1", "replace"))
