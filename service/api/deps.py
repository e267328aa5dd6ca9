"""Dependencies declared once and injected: app state, the API key check, and the size-capped body.

All are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, which would cost a
thread hop per dependency per request.
"""

from __future__ import annotations

import hmac
import zlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.metrics import ServiceMetrics
from service.repository import ModelRepository


@dataclass(frozen=True)
class Service:
    """What the routes need, built once per app (one dependency instead of three keeps requests cheap)."""

    settings: Settings
    repository: ModelRepository
    metrics: ServiceMetrics


async def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(request: Request, service: ServiceDep) -> None:
    """With ``BNFOLD_API_KEY`` set, demand ``Authorization: Bearer <key>`` (constant-time comparison)."""
    api_key = service.settings.api_key
    if api_key is None:
        return
    expected = b"Bearer " + api_key.get_secret_value().encode()
    given = request.headers.get("authorization", "").encode("latin-1", "replace")
    if not hmac.compare_digest(given, expected):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, service: ServiceDep) -> bytes:
    """The request body, refused with 413 from Content-Length before reading, capped while streaming,
    and inflated when ``Content-Encoding`` is gzip or deflate (tritonclient's request compression),
    with the same cap on the inflated size."""
    limit = service.settings.max_body_bytes
    body = await _read_capped(request, limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in INFLATE:
        raise HTTPException(415, f"Content-Encoding {encoding[:40]!r} is not supported; use gzip, deflate or identity")
    inflater = zlib.decompressobj(INFLATE[encoding])
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPException(400, f"body is not valid {encoding} data: {exc}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise HTTPException(413, f"inflated request body exceeds the limit of {limit} bytes")
    return inflated


# zlib window-bits selecting the container: gzip header, zlib header (HTTP "deflate").
INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, f"Content-Length must be a non-negative integer, got {declared[:40]!r}")
        if len(declared) > 18 or int(declared) > limit:  # 19+ digits: beyond any limit (and int()'s digit cap)
            raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        body = await request.body()
        if len(body) > limit:  # pragma: no cover - the server enforces Content-Length
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


BodyDep = Annotated[bytes, Depends(read_body)]
