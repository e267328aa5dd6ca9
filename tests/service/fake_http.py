"""A fake transport for driving :class:`service.protocol.LimitedHttpToolsProtocol` in process, and the
helpers that read what it wrote: tests feed bytes with ``data_received`` and inspect the answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class FakeTransport(asyncio.Transport):
    """Keeps what the protocol writes, and whether it closed. A write after the close is counted in
    :attr:`late_writes` and dropped; with ``strict`` it also fails the test where it happens."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.data = b""
        self.closed = False
        self.late_writes = 0
        self.strict = strict

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        if self.closed:
            self.late_writes += 1
            assert not self.strict, "written after close"
            return
        self.data += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def responses(data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Split what was written into (status line, headers, body) by content-length; 1xx answers are skipped."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines)
        if status.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): no body
            data = rest
            continue
        length = int(headers[b"content-length"])
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


async def until(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll ``condition`` on the running loop; fail after ``seconds`` (generous: a loaded machine is slow)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)
