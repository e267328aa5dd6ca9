"""Admission control of inference requests: a byte budget for this worker, and a deadline for each request.

:class:`Budget` bounds the memory that running requests hold together. A request takes its share
before it allocates: its body from ``Content-Length`` before a byte is read (chunked bodies as they
arrive), then what decoding will hold, estimated from sizes known before parsing::

    wire body + inflated body (when compressed) + JSON_PEAK_FACTOR x JSON bytes + binary tensor bytes

``JSON_PEAK_FACTOR`` is the most memory orjson's parse held per JSON byte in our measurements (peak
RSS over input size, CPython 3.11, orjson 3.x): 13x for ``0,0,...``, 15x for floats, 23x for short
strings, 30x for ``[],[],...`` and 39x for ``[[[0]]],...``, the worst shape found. Charging the
worst case keeps the bound true whatever the JSON holds; a typical 1 kB request is charged ~40 kB.
A request that would take the total past ``max_inflight_bytes`` gets 503 with ``Retry-After``;
one request alone is always admitted (the per-request limits bound it), so no setting can starve
everything. Single-threaded: only the event loop takes and returns shares.

:class:`Deadlines` gives every inference request ``request_timeout_s`` from its start. One sweep
task wakes a few times per timeout and cancels the requests past their deadline (O(1) per request:
a dict insert and delete, instead of a timer handle each): a task (gRPC, an HTTP body still being
read) gets a cancellation, which its handler turns into 504, or 408 while the body was still
arriving; an HTTP request waiting for its batch answers 504 itself.

:func:`trim_soon` hands freed heap memory back to the OS after a request that held
:data:`TRIM_BYTES` or more, so RSS returns near its baseline instead of staying at the peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import Callable
from typing import Any, Protocol

from service.errors import Overloaded

JSON_PEAK_FACTOR = 40  # most bytes held while parsing, per JSON byte (measured 39x; see the module docstring)
TRIM_BYTES = 32 * 1024 * 1024  # after a request that held this much, hand freed heap memory back to the OS


def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's ``malloc_trim`` (``None`` elsewhere): freed Python objects and arrays below glibc's mmap
    threshold stay in the heap otherwise (+40 MiB RSS after one 6 MB JSON request, measured; +7 MiB with it)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]  # the process's own libc
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_TRIM = _malloc_trim()
_trimming = False


def trim_soon() -> None:
    """Run ``malloc_trim(0)`` in a worker thread (ctypes releases the GIL), one at a time."""
    global _trimming
    if _TRIM is None or _trimming:
        return
    _trimming = True

    def run() -> None:
        global _trimming
        try:
            _TRIM(0)
        finally:
            _trimming = False

    asyncio.get_running_loop().run_in_executor(None, run)


class Budget:
    """Bytes held by in-flight inference requests of this worker, at most ``limit`` (one request always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int, own: int = 0) -> int:
        """Add ``nbytes`` for a request holding ``own`` already and return it.

        Raises :class:`Overloaded` naming the setting when that passes the limit while other requests hold some.
        """
        used = self.used
        if used + nbytes > self.limit and used > own:
            raise Overloaded(f"the server holds {used - own} bytes for other requests in flight; this one needs "
                             f"{own + nbytes}, over BNFOLD_MAX_INFLIGHT_BYTES={self.limit}; retry later")
        self.used = used + nbytes
        return nbytes

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


class Share:
    """What one request holds of a :class:`Budget`; :meth:`release` gives all of it back."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, nbytes: int) -> None:
        """Take ``nbytes`` more. Raises :class:`Overloaded` when the budget has no room."""
        self.held += self.budget.take(nbytes, self.held)

    def take_decoding(self, body_length: int, json_length: int) -> None:
        """Take what decoding a body of ``body_length`` bytes, ``json_length`` of them JSON, may hold."""
        self.take(JSON_PEAK_FACTOR * json_length + (body_length - json_length))

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


class Late(Protocol):
    """What :class:`Deadlines` tracks: an :class:`asyncio.Task`, or a request answering its own deadline."""

    def done(self) -> bool: ...

    def cancel(self) -> Any: ...


class Deadlines:
    """Each registered entry must be done within ``timeout_s``; :meth:`sweep` cancels the late ones."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._due: dict[Late, float] = {}  # insertion order = deadline order (one timeout for all)
        self.expired: set[Late] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def add(self, entry: Late, now: float) -> None:
        self._due[entry] = now + self.timeout_s

    def remove(self, entry: Late) -> None:
        """Forget ``entry`` (it finished, or answered its missed deadline)."""
        self._due.pop(entry, None)
        if self.expired:
            self.expired.discard(entry)

    def missed(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled for its deadline (and forget it); un-cancels it so it may answer."""
        if task not in self.expired:
            return False
        self.expired.discard(task)
        uncancel = getattr(task, "uncancel", None)  # Python >= 3.11: the cancellation is handled
        if uncancel is not None:
            uncancel()
        return True

    def start(self) -> None:
        """Start sweeping on the running loop (from the app's lifespan)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        period = min(1.0, max(0.05, self.timeout_s / 10))
        while True:
            await asyncio.sleep(period)
            self.sweep(time.monotonic())  # the clock of add()

    def sweep(self, now: float) -> None:
        """Cancel every entry whose deadline is before ``now`` (a task's ``cancel()`` raises in it; a request's
        answers its deadline)."""
        late = []
        for entry, due in self._due.items():
            if due > now:
                break
            late.append(entry)
        for entry in late:
            del self._due[entry]
            if not entry.done():
                self.expired.add(entry)
                entry.cancel()
