"""An inference request as callbacks (:meth:`Batcher.enqueue`, :func:`inference.infer_soon`, ``_Call``): each
request is answered exactly once, and whatever ends it (an error at any stage, its deadline, a client that
left, a shutdown) returns its model-version lease (``entry.inflight``), its byte budget and its deadline
entry; a worker's batch answers on the loop's thread; a late answer changes nothing a client or the
metrics see; an error leaves no reference cycle holding the request.

Requests go through the real protocol and app with a fake transport, on the direct path and on the ASGI
path (the direct path turned off). Where a run must be slow, the batcher's run waits for an event the
test sets, so no outcome depends on timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_http import FakeTransport, responses, until
from uvicorn.config import Config
from uvicorn.lifespan.off import LifespanOff
from uvicorn.server import Server

from service import codec, inference
from service.batching import Batcher
from service.config import Settings
from service.errors import InvalidInput, ModelNotReady
from service.main import create_app
from service.protocol import HttpLimits, LimitedHttpToolsProtocol

X = [[1.0, 2.0, 3.0, 4.0]]
BODY = json.dumps({"id": "r", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                          "data": X[0]}]}).encode()
INFER = "/v2/models/classifier/infer"


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _after_pending_callbacks() -> None:
    """Return once every callback scheduled on this loop before the call has run (the ready queue is FIFO)."""
    marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(marker.set_result, None)
    await marker


class _Server:
    """The app, started, with a uvicorn server state its connections share."""

    def __init__(self, app: Any, config: Config, server: Server) -> None:
        self.app = app
        self.config = config
        self.server = server
        self.opened: list[LimitedHttpToolsProtocol] = []

    @property
    def service(self) -> Any:
        return self.app.state.service

    def entry(self, version: str | None = None) -> Any:
        return self.service.repository.get("classifier", version)

    def connect(self, direct: bool) -> tuple[LimitedHttpToolsProtocol, FakeTransport]:
        protocol = LimitedHttpToolsProtocol(self.config, self.server.server_state, {}, asyncio.get_running_loop(),
                                            limits=HttpLimits(16384, 60.0, 60.0))
        if not direct:
            protocol._direct = None
        transport = FakeTransport(strict=False)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        self.opened.append(protocol)
        return protocol, transport

    def held(self) -> tuple[int, int, int]:
        """(budget bytes used, leases out on either version, deadline entries): all 0 when nothing is in flight."""
        endpoints = self.app.endpoints
        return (endpoints.budget.used, self.entry("1").inflight + self.entry("2").inflight,
                len(endpoints.deadlines._due) + len(endpoints.deadlines.expired))

    def metric(self, name: str, **labels: str) -> float:
        self.service.metrics.flush()
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)


def _serve(settings: Settings, scenario: Callable[[_Server], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        app = create_app(settings)
        config = Config(app=app, access_log=False, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        config.load()
        server = Server(config)
        server.lifespan = LifespanOff(config)
        server.servers = []  # no listening socket: the connections are made by the test
        running = _Server(app, config, server)
        async with app.router.lifespan_context(app):
            try:
                return await scenario(running)
            finally:
                for protocol in running.opened:
                    protocol.connection_lost(None)

    return asyncio.run(main())


class _Gate:
    """Makes a batcher's run wait until :meth:`open` (or 60 s), and tells when a run has started."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.started = threading.Event()

    def hold(self, batcher: Batcher) -> Callable[[], None]:
        original = batcher._run

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            self.started.set()
            self.event.wait(60)
            return original(feeds)

        batcher._run = run  # type: ignore[method-assign]

        def restore() -> None:
            batcher._run = original  # type: ignore[method-assign]
        return restore

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def gate() -> Iterator[_Gate]:
    held = _Gate()
    try:
        yield held
    finally:
        held.open()


# -- the batcher ---------------------------------------------------------------------------------


def _double(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [feeds["x"] * 2]


def _batcher(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]] = _double) -> Batcher:
    return Batcher("t", run, batches=True, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=8)


def test_a_worker_batch_answers_on_the_loop_thread(gate: _Gate) -> None:
    """Requests queued while the worker holds a run go to the worker thread; ``done`` still runs on the loop's
    thread, so it may touch the loop's state (budget, deadlines, transports) without a lock."""
    async def main() -> tuple[int, list[int], list[int], list[Any]]:
        ran_in: list[int] = []

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            ran_in.append(threading.get_ident())
            return _double(feeds)

        batcher = _batcher(run)
        gate.hold(batcher)
        threads: list[int] = []
        results: list[Any] = []

        def done(result: list[np.ndarray] | BaseException) -> None:
            threads.append(threading.get_ident())
            results.append(result)

        try:
            for k in range(3):
                batcher.enqueue({"x": np.full((1, 2), k, np.float32)}, done)
                if k == 0:
                    await until(gate.started.is_set, "the worker's run")  # the others queue behind it
            gate.open()
            await until(lambda: len(results) == 3, "the answers")
        finally:
            batcher.close()
        return threading.get_ident(), ran_in, threads, results

    loop_thread, ran_in, threads, results = asyncio.run(main())
    assert ran_in and loop_thread not in ran_in  # every run took the worker thread
    assert threads == [loop_thread] * 3
    for k, result in enumerate(results):
        np.testing.assert_array_equal(result[0], np.full((1, 2), 2 * k, np.float32))


@pytest.mark.parametrize("inline", [pytest.param(False, id="worker"), pytest.param(True, id="inline")])
def test_a_failing_done_does_not_stop_the_rest_of_its_batch(inline: bool) -> None:
    async def main() -> list[Any]:
        batcher = _batcher()
        if inline:
            batcher._row_seconds = 0.0  # cheap: the batch runs on the loop
        answers: list[Any] = []

        def broken(result: Any) -> None:
            raise RuntimeError("bug in a callback")

        try:
            batcher.enqueue({"x": np.ones((1, 2), np.float32)}, broken)
            batcher.enqueue({"x": np.full((1, 2), 3, np.float32)}, answers.append)
            batcher.enqueue({"x": np.full((1, 2), 5, np.float32)}, answers.append)
            await until(lambda: len(answers) == 2, "the other answers")
            await _after_pending_callbacks()
        finally:
            batcher.close()
        return answers

    answers = asyncio.run(main())
    assert [float(a[0][0, 0]) for a in answers] == [6.0, 10.0]


def test_a_request_running_when_its_batcher_closes_is_answered_once(gate: _Gate) -> None:
    """``close()`` waits a bounded time for the worker, then fails what it holds. A run that outlasts that wait
    (a slow model, a retiring version) must still answer its request once: a second answer returns the
    version's lease twice and hands ``then`` two results."""
    async def main() -> tuple[list[Any], int]:
        batcher = _batcher()
        gate.hold(batcher)
        calls: list[Any] = []
        batcher.enqueue({"x": np.ones((1, 2), np.float32)}, calls.append)
        await until(gate.started.is_set, "the run's start")
        thread = batcher._thread
        thread.join = lambda timeout=None: threading.Thread.join(thread, 0.01)  # type: ignore[method-assign]
        batcher.close()  # the join gives up: the run is still going
        gate.open()
        await until(lambda: not thread.is_alive(), "the worker's end")  # close()'s stop outlives the drain
        await _after_pending_callbacks()
        return calls, len(calls)

    calls, count = asyncio.run(main())
    assert count == 1, [type(c).__name__ for c in calls]


# -- lease, budget, deadline entry at each stage -------------------------------------------------


def _ready_body(size: int) -> bytes:
    """A valid JSON request of about ``size`` bytes (spaces pad it, so it decodes the same)."""
    return BODY[:-1] + b" " * max(0, size - len(BODY)) + b"}"


STAGES: dict[str, tuple[bytes, str, int]] = {
    "success": (BODY, "", 200),
    "bad-header-length": (BODY, "Inference-Header-Content-Length: 99999\r\n", 400),
    "over-json-limit": (_ready_body(3000), "", 413),
    "decode-error": (b'{"inputs": [', "", 400),
    "wrong-datatype": (BODY.replace(b"FP32", b"INT8"), "", 400),
    "overloaded": (BODY, "", 503),
    "batcher-failed": (BODY, "", 503),
    "onnxruntime-error": (BODY, "", 400),
    "encode-bug": (BODY, "", 500),
}


@pytest.mark.parametrize("direct", [pytest.param(True, id="direct"), pytest.param(False, id="asgi")])
@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_answers_once_and_returns_lease_budget_and_deadline(
        repository: Path, monkeypatch: pytest.MonkeyPatch, stage: str, direct: bool) -> None:
    body, extra, status = STAGES[stage]
    settings = Settings(model_repository=repository, intra_op_threads=1, max_json_bytes=2048)

    async def scenario(server: _Server) -> Any:
        batcher = server.entry().batcher
        if stage == "overloaded":
            monkeypatch.setattr(batcher, "max_queue_size", 0)
        elif stage == "batcher-failed":
            monkeypatch.setattr(batcher, "failure", "stopped by the test")
        elif stage == "onnxruntime-error":
            def refuse(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                raise RuntimeError("index out of range")
            monkeypatch.setattr(batcher, "_run", refuse)
        elif stage == "encode-bug":
            def broken(*args: Any) -> Any:
                raise KeyError("bug in the encoder")
            monkeypatch.setattr(codec, "encode_infer_response", broken)
        protocol, transport = server.connect(direct)
        protocol.data_received(_post(INFER, body, extra))
        await until(lambda: bool(transport.data), "the answer")
        await until(lambda: not protocol.tasks, "the request's end")
        await _after_pending_callbacks()
        return responses(transport.data), server.held(), transport.late_writes

    answers, held, late = _serve(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 %d" % status], answers
    assert held == (0, 0, 0) and late == 0


def test_a_large_json_decoded_off_the_loop_returns_its_lease_on_error(repository: Path) -> None:
    """JSON over OFFLOAD_BYTES is decoded in a thread (the ASGI path: the direct one takes smaller bodies)."""
    settings = Settings(model_repository=repository, intra_op_threads=1)
    bad = b'{"inputs": [' + b" " * (inference.OFFLOAD_BYTES + 10) + b"x"
    good = _ready_body(inference.OFFLOAD_BYTES + 10)

    async def scenario(server: _Server) -> Any:
        out = []
        for body in (bad, good):
            protocol, transport = server.connect(False)
            protocol.data_received(_post(INFER, body))
            await until(lambda t=transport: bool(t.data), "the answer")  # type: ignore[misc]
            await until(lambda p=protocol: not p.tasks, "the request's end")  # type: ignore[misc]
            out.append((responses(transport.data), server.held()))
        return out

    (bad_answers, bad_held), (good_answers, good_held) = _serve(settings, scenario)
    assert [a[0][:12] for a in bad_answers] == [b"HTTP/1.1 400"] and bad_held == (0, 0, 0)
    assert [a[0][:12] for a in good_answers] == [b"HTTP/1.1 200"] and good_held == (0, 0, 0)
    assert json.loads(good_answers[0][2])["id"] == "r"


# -- deadlines and late answers ------------------------------------------------------------------


def _late_scenario(direct: bool, gate: _Gate, error: bool) -> Callable[[_Server], Awaitable[Any]]:
    """A request that misses its deadline while its run waits on ``gate``; the run then answers (an error when
    ``error``). Returns what was written, whether it closed, what stays held, and the request metrics."""
    async def scenario(server: _Server) -> Any:
        batcher = server.entry().batcher
        restore = gate.hold(batcher)
        if error:
            original = batcher._run

            def failing(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                original(feeds)
                raise RuntimeError("index out of range")
            batcher._run = failing  # type: ignore[method-assign]
        try:
            protocol, transport = server.connect(direct)
            protocol.data_received(_post(INFER, BODY))
            await until(lambda: transport.closed, "the 504")
            written = transport.data
            leases_after_504 = server.entry().inflight
            gate.open()
            await until(lambda: server.entry().inflight == 0, "the late answer")
            await _after_pending_callbacks()
        finally:
            restore()
        metrics = {outcome: server.metric("bnfold_requests_total", model="classifier", outcome=outcome)
                   for outcome in ("success", "invalid_input")}
        errors = {status: server.metric("bnfold_http_errors_total", status=status) for status in ("400", "504")}
        return (responses(written), transport.data == written, transport.late_writes, leases_after_504,
                server.held(), metrics, errors)
    return scenario


@pytest.mark.parametrize("direct", [pytest.param(True, id="direct"), pytest.param(False, id="asgi")])
def test_a_late_answer_after_the_504_writes_nothing_and_returns_lease_and_budget(
        repository: Path, gate: _Gate, direct: bool) -> None:
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    scenario = _late_scenario(direct, gate, False)
    answers, unchanged, late_writes, leases_after_504, held, _, _ = _serve(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 504"] and answers[0][1][b"connection"] == b"close"
    assert unchanged and late_writes == 0
    assert leases_after_504 == 1  # the version stays leased while its run may still read it
    assert held == (0, 0, 0)


@pytest.mark.parametrize("error", [pytest.param(False, id="late-success"), pytest.param(True, id="late-error")])
@pytest.mark.parametrize("direct", [pytest.param(True, id="direct"), pytest.param(False, id="asgi")])
def test_a_late_answer_after_the_504_is_not_counted_again(repository: Path, gate: _Gate, direct: bool,
                                                          error: bool) -> None:
    """The client got one answer, a 504: the metrics must say so, and nothing else about this request."""
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    *_, metrics, errors = _serve(settings, _late_scenario(direct, gate, error))
    assert errors == {"400": 0.0, "504": 1.0}
    assert metrics == {"success": 0.0, "invalid_input": 0.0}


def test_an_asgi_body_past_its_deadline_gets_408_and_returns_its_budget(repository: Path) -> None:
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    raw = _post(INFER, BODY)

    async def scenario(server: _Server) -> Any:
        protocol, transport = server.connect(False)
        protocol.data_received(raw[:-5])  # the body never completes
        await until(lambda: transport.closed, "the 408")
        await until(lambda: not protocol.tasks, "the request's end")
        return responses(transport.data), server.held()

    answers, held = _serve(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 408"] and held == (0, 0, 0)


# -- clients, pipelining, shutdown ---------------------------------------------------------------


@pytest.mark.parametrize("direct", [pytest.param(True, id="direct"), pytest.param(False, id="asgi")])
def test_a_client_gone_before_its_answer_returns_lease_and_budget(settings: Settings, gate: _Gate,
                                                                  direct: bool) -> None:
    async def scenario(server: _Server) -> Any:
        restore = gate.hold(server.entry().batcher)
        try:
            protocol, transport = server.connect(direct)
            protocol.data_received(_post(INFER, BODY))
            await until(gate.started.is_set, "the run's start")
            protocol.connection_lost(None)
            gate.open()
            await until(lambda: server.held() == (0, 0, 0), "the request's end")
            await until(lambda: not protocol.tasks, "the tasks' end")
            await _after_pending_callbacks()
        finally:
            restore()
        return transport.data, transport.late_writes

    data, late = _serve(settings, scenario)
    assert data == b"" and late == 0


def test_pipelined_requests_behind_one_in_flight_are_answered_in_order(settings: Settings, gate: _Gate) -> None:
    """A slow request, then an error found at once, a good one and a ``Connection: close`` one behind it."""
    first = _post(INFER, BODY.replace(b'"r"', b'"first"'))
    refused = _post("/v2/models/nope/infer", BODY)
    second = _post(INFER, BODY.replace(b'"r"', b'"second"'))
    last = _post(INFER, BODY.replace(b'"r"', b'"last"'), "Connection: close\r\n")
    after = _post(INFER, BODY)  # after the close: never answered

    async def scenario(server: _Server) -> Any:
        restore = gate.hold(server.entry().batcher)
        try:
            protocol, transport = server.connect(True)
            protocol.data_received(first + refused + second + last + after)
            await until(gate.started.is_set, "the first run")
            assert transport.data == b""  # nothing overtakes the request in flight
            gate.open()
            await until(lambda: transport.closed, "the close")
            await until(lambda: not protocol.tasks, "the requests' end")
            await _after_pending_callbacks()
        finally:
            restore()
        return responses(transport.data), server.held(), transport.late_writes

    answers, held, late = _serve(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 404", b"HTTP/1.1 200", b"HTTP/1.1 200"]
    assert [json.loads(answers[k][2])["id"] for k in (0, 2, 3)] == ["first", "second", "last"]
    assert answers[3][1][b"connection"] == b"close"
    assert held == (0, 0, 0) and late == 0


def test_graceful_shutdown_waits_for_a_direct_request_in_flight(settings: Settings, gate: _Gate) -> None:
    """uvicorn's shutdown waits while ``server_state.tasks`` holds the direct request, then it is answered."""
    async def scenario(server: _Server) -> Any:
        restore = gate.hold(server.entry().batcher)
        try:
            protocol, transport = server.connect(True)
            protocol.data_received(_post(INFER, BODY))
            await until(gate.started.is_set, "the run's start")
            protocol.shutdown()
            waiting = len(server.server.server_state.tasks)
            gate.open()
            await until(lambda: transport.closed, "the close")
            await until(lambda: not server.server.server_state.tasks, "the tasks' end")
        finally:
            restore()
        return waiting, responses(transport.data), server.held()

    waiting, answers, held = _serve(settings, scenario)
    assert waiting == 1
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200"] and answers[0][1][b"connection"] == b"close"
    assert held == (0, 0, 0)


def test_uvicorn_forced_shutdown_answers_direct_requests_500(settings: Settings, gate: _Gate) -> None:
    """Past ``timeout_graceful_shutdown`` uvicorn's own ``Server.shutdown`` cancels every task in
    ``server_state.tasks`` (iterating the set itself, not a copy): two direct requests get 500 and a close."""
    async def scenario(server: _Server) -> Any:
        restore = gate.hold(server.entry().batcher)
        try:
            connections = [server.connect(True) for _ in range(2)]
            for protocol, _ in connections:
                protocol.data_received(_post(INFER, BODY))
            await until(gate.started.is_set, "the run's start")
            error: BaseException | None = None
            try:
                await server.server.shutdown()
            except RuntimeError as exc:
                error = exc
        finally:
            gate.open()
            restore()
        await until(lambda: server.held() == (0, 0, 0), "the runs' end")
        return error, [(responses(t.data), t.closed) for _, t in connections]

    error, out = _serve(settings, scenario)
    assert error is None, error
    for answers, closed in out:
        assert [a[0][:12] for a in answers] == [b"HTTP/1.1 500"] and closed


# -- reference cycles ----------------------------------------------------------------------------


async def _cycle_frames(step: Callable[[], Awaitable[None]]) -> list[str]:
    """Names of the frames that only the cyclic GC frees after ``step()`` (run with the GC paused)."""
    gc.collect()
    gc.disable()
    try:
        await step()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
    finally:
        gc.set_debug(0)
        gc.enable()
    names = sorted({o.f_code.co_name for o in gc.garbage if isinstance(o, types.FrameType)})
    gc.garbage.clear()
    return names


MALFORMED = {"malformed-json": b'{"inputs": [', "wrong-datatype": BODY.replace(b"FP32", b"INT8")}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_decode_error_through_infer_leaves_no_cycle_holding_the_body(settings: Settings, case: str) -> None:
    body = MALFORMED[case]

    async def scenario(server: _Server) -> list[str]:
        async def step() -> None:
            try:
                await inference.infer(server.service.repository, "classifier", None, body, None)
            except InvalidInput:
                return
            raise AssertionError("the request was served")
        return await _cycle_frames(step)

    frames = _serve(settings, scenario)
    assert "infer" not in frames and "decode" not in frames, frames


@pytest.mark.parametrize("direct", [pytest.param(True, id="direct"), pytest.param(False, id="asgi")])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_decode_error_over_http_leaves_no_cycle(settings: Settings, case: str, direct: bool) -> None:
    raw = _post(INFER, MALFORMED[case])

    async def scenario(server: _Server) -> tuple[list[str], Any]:
        protocol, transport = server.connect(direct)

        async def step() -> None:
            protocol.data_received(raw)
            await until(lambda: bool(transport.data), "the answer")
            await until(lambda: not protocol.tasks, "the request's end")
            await _after_pending_callbacks()
        return await _cycle_frames(step), responses(transport.data)

    frames, answers = _serve(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 400"]
    assert "decode" not in frames and "start" not in frames, frames


def test_model_not_ready_before_queueing_raises_and_returns_the_lease(settings: Settings) -> None:
    """``infer_soon`` raises what it finds before queueing (and does not call ``then``); a failed batcher's
    ModelNotReady, found when queueing, goes to ``then``; either way the lease comes back."""
    async def main() -> tuple[list[Any], int, int]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            repository = app.state.service.repository
            entry = repository.get("classifier")
            got: list[Any] = []
            with pytest.raises(InvalidInput):
                inference.infer_soon(repository, "classifier", None, BODY, "99999", codec.NO_LIMITS, None,
                                     got.append)
            raised_inflight = entry.inflight
            entry.batcher.failure = "stopped by the test"
            try:
                inference.infer_soon(repository, "classifier", None, BODY, None, codec.NO_LIMITS, None, got.append)
            finally:
                entry.batcher.failure = None
            return got, raised_inflight, entry.inflight

    got, raised_inflight, inflight = asyncio.run(main())
    assert len(got) == 1 and isinstance(got[0], ModelNotReady)
    assert raised_inflight == 0 and inflight == 0
