"""The request body, read straight from the ASGI ``receive`` channel with the service's size limits.

Refused with 413 from ``Content-Length`` before reading, capped while streaming (chunked bodies),
and inflated when ``Content-Encoding`` is gzip or deflate (tritonclient's request compression),
with the same cap on the inflated size. A compressed body must end exactly where its stream ends:
a missing end (gzip's CRC-32 and length trailer cut off) or bytes after it are a 400, since either
means the body is not what the client sent. Every byte held is taken from the request's
:class:`~service.api.admission.Share` first (the declared length before reading). Inflating more
than :data:`OFFLOAD_BYTES` runs in a worker thread (zlib releases the GIL), so probes stay fast.
Errors are :class:`HTTPException` with the message the client sees.
"""

from __future__ import annotations

import asyncio
import zlib

from fastapi import HTTPException
from starlette.types import Receive

from service.api.admission import Share

# zlib window-bits selecting the container: gzip header, zlib header (HTTP "deflate").
INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
OFFLOAD_BYTES = 64 * 1024  # compressed bodies (or JSON) larger than this are inflated (parsed) off the event loop


class ClientGone(Exception):
    """The client disconnected before sending the whole body: there is nobody to answer."""


async def read_body(receive: Receive, content_length: bytes | None, content_encoding: bytes | None,
                    limit: int, share: Share | None = None) -> bytes:
    """The (inflated) body of at most ``limit`` bytes; header values are raw bytes, ``None`` when absent."""
    body = await _read_capped(receive, content_length, limit, share)
    encoding = (content_encoding or b"identity").decode("latin-1").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in INFLATE:
        raise HTTPException(415, f"Content-Encoding {encoding[:40]!r} is not supported; use gzip, deflate or identity")
    if len(body) > OFFLOAD_BYTES:
        inflated = await asyncio.get_running_loop().run_in_executor(None, inflate, body, encoding, limit)
    else:
        inflated = inflate(body, encoding, limit)
    if share is not None:
        share.take(len(inflated))
    return inflated


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` inflated (``encoding`` a key of :data:`INFLATE`): at most ``limit`` bytes, ending with its stream."""
    inflater = zlib.decompressobj(INFLATE[encoding])
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPException(400, f"body is not valid {encoding} data: {exc}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise HTTPException(413, f"inflated request body exceeds the limit of {limit} bytes (BNFOLD_MAX_BODY_BYTES)")
    if not inflater.eof:
        raise HTTPException(400, f"{encoding} body is truncated: it stops before the end of its compressed stream"
                                 + (" and its CRC-32 trailer" if encoding != "deflate" else " and its checksum"))
    if inflater.unused_data:
        raise HTTPException(400, f"{encoding} body has {len(inflater.unused_data)} bytes after the end of its "
                                 "compressed stream")
    return inflated


async def _read_capped(receive: Receive, content_length: bytes | None, limit: int, share: Share | None) -> bytes:
    if content_length is not None:
        declared = content_length.decode("latin-1")
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, f"Content-Length must be a non-negative integer, got {declared[:40]!r}")
        if len(declared) > 18 or int(declared) > limit:  # 19+ digits: beyond any limit (and int()'s digit cap)
            raise HTTPException(413, f"request body of {declared[:40]} bytes exceeds the limit of {limit} bytes "
                                     "(BNFOLD_MAX_BODY_BYTES)")
        if share is not None:
            share.take(int(declared))  # before a byte is read: stalled uploads cannot hold more than the budget
            share = None
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
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes (BNFOLD_MAX_BODY_BYTES)")
            if share is not None:  # chunked: no length declared, take what arrives
                share.take(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
