"""The request body, read straight from the ASGI ``receive`` channel with the service's size limits.

Refused with 413 from ``Content-Length`` before reading, capped while streaming (chunked bodies),
and inflated when ``Content-Encoding`` is gzip or deflate (tritonclient's request compression),
with the same cap on the inflated size. Errors are :class:`HTTPException` with the message the
client sees.
"""

from __future__ import annotations

import zlib

from fastapi import HTTPException
from starlette.types import Receive

# zlib window-bits selecting the container: gzip header, zlib header (HTTP "deflate").
INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class ClientGone(Exception):
    """The client disconnected before sending the whole body: there is nobody to answer."""


async def read_body(receive: Receive, content_length: bytes | None, content_encoding: bytes | None,
                    limit: int) -> bytes:
    """The (inflated) body of at most ``limit`` bytes; header values are raw bytes, ``None`` when absent."""
    body = await _read_capped(receive, content_length, limit)
    encoding = (content_encoding or b"identity").decode("latin-1").strip().lower()
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


async def _read_capped(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    if content_length is not None:
        declared = content_length.decode("latin-1")
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, f"Content-Length must be a non-negative integer, got {declared[:40]!r}")
        if len(declared) > 18 or int(declared) > limit:  # 19+ digits: beyond any limit (and int()'s digit cap)
            raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
