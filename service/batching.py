"""Dynamic batching: coalesce concurrent requests for one model into one onnxruntime run.

Each model has one worker thread and a bounded queue. The worker takes the oldest request, then
every queued request with the same per-row shapes and dtypes until ``max_batch_size`` rows (waiting
at most ``max_queue_delay`` for more; 0 = take only what is already queued, so a lone request never
waits), concatenates inputs along axis 0, runs once, and hands each caller the slice ``[a, b)`` of
rows it sent. Under load, requests pile up while a batch runs, so batches grow with concurrency.
If a coalesced run fails, its requests are retried one by one so one bad input fails only itself.

*Inline runs.* With ``max_queue_delay`` 0, when the worker is idle and the last run's time per row
says the batch will take at most ``inline_s``, the batch runs on the caller's event loop instead:
requests that arrive in the same loop iteration are collected (``loop.call_soon``), then run as one
batch in that loop's thread, with no hand-off to the worker and back (two thread wake-ups, GIL
hand-overs and a self-pipe write per batch; at low load, most of the latency a request adds, measured in
``benchmarks/results/serving_profile.md``). The loop is blocked for at most about ``inline_s``; anything
longer, the first run of a model (no estimate yet), or a queue the worker is busy with, goes to the worker.

A request is queued with a callback (:meth:`Batcher.enqueue`), which gets its outputs or the error
of its run once, on the caller's loop: straight from an inline batch, or from the one
``call_soon_threadsafe`` per loop that a worker's batch takes; :meth:`Batcher.submit` awaits the same.

The worker survives any exception while it collects or runs a batch (the batch's callers get the
error). Should it stop anyway, or be closed, the batcher *fails*: every request it holds or has
queued, and every later one, gets :class:`~service.errors.ModelNotReady` (503) instead of waiting
forever, and ``on_failure`` tells the owner (the repository marks the model version not ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from service.errors import InvalidInput, ModelNotReady, Overloaded
from service.logs import event

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
Done = Callable[[list[np.ndarray] | BaseException], None]  # a request's outputs, or why it got none
Results = list[tuple["_Item", list[np.ndarray] | BaseException]]
Observed = Callable[[], None] | None  # a batch's observation, made where its answers are given
INLINE_S = 0.005  # a batch expected to run this long at most runs on the event loop (see the module docstring)


class BatchObserver(Protocol):
    """Told each batch's rows and its requests' queue times, on the requests' event loop thread (before the
    answers), so that it needs no lock: the service's metrics count there (:mod:`service.metrics`)."""

    def batch(self, rows: int, queue_seconds: list[float]) -> None: ...


class _Item:
    """One queued request (a plain slotted class: built once per request on the hot path)."""

    __slots__ = ("done", "enqueued", "feeds", "key", "loop", "nbytes", "rows")

    def __init__(self, feeds: dict[str, np.ndarray], rows: int, key: tuple[Any, ...], done: Done,
                 loop: asyncio.AbstractEventLoop, nbytes: int) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.done: Done | None = done  # None once answered
        self.loop = loop
        self.nbytes = nbytes
        self.enqueued = time.perf_counter()


_STOP = object()


def _resolve(item: _Item, result: list[np.ndarray] | BaseException) -> None:
    """Call ``item.done(result)`` the first time only (on the item's loop, so without a race): a request
    answered by :meth:`Batcher.close` while its run went on is not answered again when the run ends.
    A failing callback is logged and does not stop the batch's other answers."""
    done = item.done
    if done is None:
        return
    item.done = None
    try:
        done(result)
    except Exception as exc:  # a bug in the caller's callback: the other requests of the batch still get theirs
        event(logging.ERROR, "internal error", where="batch callback", error=f"{type(exc).__name__}: {exc}")


def _resolve_all(results: list[tuple[_Item, list[np.ndarray] | BaseException]], observed: Observed = None) -> None:
    """Answer requests in their own loop's thread (an inline batch's, or a worker batch's once handed over),
    after making the batch's observation."""
    if observed is not None:
        try:
            observed()
        except Exception as exc:  # a metrics bug must not cost the batch its answers
            event(logging.ERROR, "internal error", where="batch observer", error=f"{type(exc).__name__}: {exc}")
    for item, result in results:
        _resolve(item, result)


class Resolver:
    """A callback resolving ``future`` with its argument (raised by the awaiter when an exception), once,
    unless the awaiter was cancelled meanwhile. It drops the future once called: an error's traceback
    reaches the frames holding this callback, and a held future (holding that error) would close a cycle
    that keeps the request's data alive until a GC pass."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future: asyncio.Future[Any] | None = future

    def __call__(self, result: Any) -> None:
        future, self.future = self.future, None
        if future is None or future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _deliver(item: _Item, result: list[np.ndarray] | BaseException) -> None:
    """Hand ``result`` to the caller's event loop (thread-safe); a closed loop means the caller is gone."""
    _deliver_all([(item, result)])


def _deliver_all(results: list[tuple[_Item, list[np.ndarray] | BaseException]], observed: Observed = None) -> None:
    """:func:`_deliver` for a whole batch: one event-loop wake-up per loop, not one per request; the
    observation is made on the first request's loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for item, result in results:
        by_loop.setdefault(item.loop, []).append((item, result))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone, the observation goes on
            loop.call_soon_threadsafe(_resolve_all, pairs, observed)
            observed = None


class Batcher:
    """A worker thread running ``run`` over coalesced requests; :meth:`submit` is called on the event loop.

    Preconditions (``ValueError`` otherwise): ``max_batch_size`` and ``max_queue_size`` are integers >= 1,
    ``max_queue_delay_s`` is a finite number >= 0. ``on_failure(reason)`` is called once, from the worker
    thread, if the worker stops for any reason other than :meth:`close`.
    """

    def __init__(self, name: str, run: RunFn, *, batches: bool, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, max_queue_bytes: int | None = None,
                 observer: BatchObserver | None = None, on_failure: Callable[[str], None] | None = None,
                 inline_s: float = INLINE_S) -> None:
        for key, value in (("max_batch_size", max_batch_size), ("max_queue_size", max_queue_size)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if not isinstance(max_queue_delay_s, int | float) or not math.isfinite(max_queue_delay_s) \
                or max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be a finite number >= 0, got {max_queue_delay_s!r}")
        self.name = name
        self._run = run
        self.batches = batches
        self.max_batch_size = max_batch_size if batches else 1
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0  # input bytes accepted but not yet running
        self._bytes_lock = threading.Lock()
        self._observer = observer
        self._on_failure = on_failure
        self.failure: str | None = None  # why this batcher no longer serves; set once, under _bytes_lock
        self._held: list[_Item] = []  # taken off the queue by the worker and not yet answered
        self.inline_s = inline_s if max_queue_delay_s == 0 else 0.0
        self._row_seconds: float | None = None  # run time per row of the last run: whether a batch may run inline
        self._pending: list[_Item] = []  # collected on one loop for an inline run at the end of its iteration
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"bnfold-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Queue one request and wait for its own outputs (:meth:`enqueue` with a future)."""
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self.enqueue(feeds, Resolver(future))
        return await future

    def enqueue(self, feeds: dict[str, np.ndarray], done: Done) -> None:
        """Queue one request; ``done`` gets its own outputs (or the exception of its run) once, on this loop.

        Call on the event loop. Raises :class:`Overloaded` when the queue is full, :class:`ModelNotReady`
        once the batcher failed (and then ``done`` is never called). No task and no future: the answer
        reaches ``done`` straight from the batch (inline) or from the one wake-up per batch that a
        worker's answers take (``call_soon_threadsafe``).
        """
        if self.failure is not None:
            raise self._not_ready()
        if self._queue.qsize() + len(self._pending) >= self.max_queue_size:
            raise Overloaded(f"model {self.name!r} already has {self.max_queue_size} requests queued "
                             "(max_queue_size); retry later")
        loop = asyncio.get_running_loop()
        if len(feeds) == 1:  # the common case, without the generators below
            ((name, first),) = feeds.items()
            nbytes = first.nbytes
            # the dtype object, not its .str (a new string per call): equal dtypes compare and hash equal
            key: tuple[Any, ...] = ((name, first.shape[1:], first.dtype),) if self.batches else ()
        else:
            first = next(iter(feeds.values()))
            nbytes = sum(a.nbytes for a in feeds.values())
            key = tuple((n, a.shape[1:], a.dtype) for n, a in feeds.items()) if self.batches else ()
        rows = first.shape[0] if self.batches and first.ndim else 1
        item = _Item(feeds, rows, key, done, loop, nbytes)
        with self._bytes_lock:  # also orders this put before a failure's drain of the queue (_fail)
            if self.failure is not None:
                raise self._not_ready()
            if self.max_queue_bytes is not None and self._queued_bytes and \
                    self._queued_bytes + nbytes > self.max_queue_bytes:
                raise Overloaded(f"model {self.name!r} already has {self._queued_bytes} input bytes queued; "
                                 f"{nbytes} more would pass max_queue_bytes={self.max_queue_bytes}; retry later")
            self._queued_bytes += nbytes
            # Whether it may wait for an inline run: cheap enough, the worker idle, no other loop's batch pending.
            row_seconds = self._row_seconds
            if row_seconds is not None and row_seconds <= self.inline_s and not self._held and self._queue.empty() \
                    and (not self._pending or self._pending_loop is loop):
                if not self._pending:
                    self._pending_loop = loop
                    loop.call_soon(self._flush)
                self._pending.append(item)
            else:
                self._queue.put(item)

    def _flush(self) -> None:
        """Run the requests collected in this loop iteration, inline when still cheap and the worker idle."""
        with self._bytes_lock:
            pending, self._pending, self._pending_loop = self._pending, [], None
            if self.failure is not None:
                fail = self._not_ready()
                self._queued_bytes -= sum(i.nbytes for i in pending)
            else:
                fail = None
                rows = sum(i.rows for i in pending)
                cost = self._row_seconds
                if cost is None or rows * cost > self.inline_s or self._held or not self._queue.empty():
                    for item in pending:  # the worker takes them, in order
                        self._queue.put(item)
                    return
                self._queued_bytes -= sum(i.nbytes for i in pending)
        if fail is not None:
            _resolve_all([(item, fail) for item in pending])
            return
        groups: dict[tuple[Any, ...], tuple[list[list[_Item]], list[int]]] = {}
        limit = self.max_batch_size
        for item in pending:  # compatible requests together, at most max_batch_size rows a batch, in order
            group = groups.get(item.key)
            if group is None:
                group = groups[item.key] = ([[]], [0])
            batches, rows_of = group
            if batches[-1] and rows_of[-1] + item.rows > limit:
                batches.append([])
                rows_of.append(0)
            batches[-1].append(item)
            rows_of[-1] += item.rows
        for batches, _ in groups.values():
            for batch in batches:
                try:
                    self._execute(batch, _resolve_all)
                except Exception as exc:  # as in the worker: the batch's callers get the error
                    _resolve_all([(item, RuntimeError(f"batch failed: {exc!r}")) for item in batch])

    def _not_ready(self) -> ModelNotReady:
        return ModelNotReady(f"model {self.name!r} is not ready: {self.failure}")

    def close(self) -> None:
        """Stop the worker after the queued requests; later requests get :class:`ModelNotReady`."""
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
        self._fail("the server is shutting down", notify=False)

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # what _serve does not survive (e.g. a failure while answering an error)
            self._fail(f"batching worker stopped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def _serve(self) -> None:
        carry: _Item | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                return
            batch = self._held = [first]
            stop = False
            try:
                try:
                    carry, stop = self._collect(batch)
                finally:
                    if carry is not None:
                        self._held = [*batch, carry]
                    self._release(batch)
                self._execute(batch)
            except Exception as exc:  # never let the worker die: every later request would hang
                _deliver_all([(item, RuntimeError(f"batch failed: {exc!r}")) for item in batch])
            self._held = [] if carry is None else [carry]
            if stop:
                return

    def _collect(self, batch: list[_Item]) -> tuple[_Item | None, bool]:
        """Append compatible queued requests to ``batch`` (which holds the first); return (carry, stop)."""
        first = batch[0]
        rows = first.rows
        if not self.batches:
            return None, False
        deadline = time.perf_counter() + self.max_queue_delay_s
        while rows < self.max_batch_size:
            try:
                remaining = min(deadline - time.perf_counter(), threading.TIMEOUT_MAX)
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return None, True
            if item.key != first.key or rows + item.rows > self.max_batch_size:
                return item, False
            batch.append(item)
            rows += item.rows
        return None, False

    def _release(self, batch: list[_Item]) -> None:
        """Running requests no longer count against ``max_queue_bytes``."""
        with self._bytes_lock:
            self._queued_bytes -= sum(i.nbytes for i in batch)

    def _fail(self, reason: str, notify: bool = True) -> None:
        """Stop serving: answer every held and queued request with :class:`ModelNotReady`, then notify."""
        with self._bytes_lock:
            if self.failure is not None:
                return
            self.failure = reason
        pending = list(self._held)
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
            else:
                pending.append(item)
        if stop:  # close()'s: a worker still running its batch stops after it instead of waiting forever
            self._queue.put(_STOP)
        _deliver_all([(item, self._not_ready()) for item in pending])
        if notify and self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(reason)

    def _execute(self, batch: list[_Item],
                 deliver: Callable[[Results, Observed], None] = _deliver_all) -> None:
        start = time.perf_counter()
        observer = self._observer
        observed = None if observer is None else \
            functools.partial(observer.batch, sum(i.rows for i in batch), [start - i.enqueued for i in batch])
        if len(batch) == 1:
            item = batch[0]
            deliver([(item, self._run_one(item.feeds, item.rows))], observed)
            return
        feeds = {name: np.concatenate([i.feeds[name] for i in batch]) for name in batch[0].feeds}
        total = sum(i.rows for i in batch)
        try:
            began = time.perf_counter()
            outputs = self._run(feeds)
            self._row_seconds = (time.perf_counter() - began) / total
            if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
                raise ValueError(f"outputs {[o.shape for o in outputs]} do not have {total} rows")
        except Exception:  # retry one by one so only a bad input fails
            deliver([(item, self._run_one(item.feeds, item.rows)) for item in batch], observed)
            return
        results: list[tuple[_Item, list[np.ndarray] | BaseException]] = []
        start_row = 0
        for item in batch:
            stop_row = start_row + item.rows
            results.append((item, [o[start_row:stop_row] for o in outputs]))
            start_row = stop_row
        deliver(results, observed)

    def _run_one(self, feeds: dict[str, np.ndarray], rows: int = 1) -> list[np.ndarray] | BaseException:
        try:
            began = time.perf_counter()
            outputs = self._run(feeds)
            self._row_seconds = (time.perf_counter() - began) / max(1, rows)
            return outputs
        except Exception as exc:  # onnxruntime rejects this input (e.g. an index out of range)
            return InvalidInput(f"onnxruntime could not run this input: {' '.join(str(exc).split())[:500]}")
