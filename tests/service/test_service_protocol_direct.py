"""The protocol's direct path (:mod:`service.protocol`): inference requests answered without ASGI.

Every request is sent twice over the real protocol and app with a fake transport: once with the
direct path on, once with it off (the ASGI path). The answers must be the same bytes, except the
``date`` header; pipelining, split reads, disconnects, the limits' timers and connection handling
are checked on the direct path itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_http import FakeTransport, responses, until
from pydantic import SecretStr
from uvicorn.config import Config
from uvicorn.server import ServerState

from service import protocol as http_protocol
from service.config import Settings
from service.main import create_app
from service.protocol import DIRECT_BODY_BYTES, HttpLimits, LimitedHttpToolsProtocol, _direct_app, _DirectCycle

X = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.5, 0.0]]
JSON_BODY = json.dumps({"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                                                "data": [v for row in X for v in row]}]}).encode()


def _binary_body() -> tuple[bytes, int]:
    raw = np.asarray(X, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


Scenario = Callable[[Callable[[bool], Awaitable[tuple[LimitedHttpToolsProtocol, FakeTransport]]]], Awaitable[Any]]


def _run(settings: Settings, scenario: Scenario, limits: HttpLimits | None = None, keep_alive_s: float = 5) -> Any:
    """Run ``scenario(connect)`` with the app started; ``connect(direct)`` opens a connection."""
    async def main() -> Any:
        app = create_app(settings)
        config = Config(app=app, access_log=False, log_level="warning", lifespan="off",
                        timeout_keep_alive=keep_alive_s)  # type: ignore[arg-type]  # any number: call_later
        config.load()
        state = ServerState()
        opened: list[LimitedHttpToolsProtocol] = []

        async def connect(direct: bool) -> tuple[LimitedHttpToolsProtocol, FakeTransport]:
            protocol = LimitedHttpToolsProtocol(config, state, {}, asyncio.get_running_loop(),
                                                limits=limits or HttpLimits(16384, 30.0, 30.0))
            if not direct:
                protocol._direct = None
            transport = FakeTransport()
            protocol.connection_made(transport)
            opened.append(protocol)
            return protocol, transport

        async with app.router.lifespan_context(app):
            try:
                return await scenario(connect)
            finally:
                for protocol in opened:
                    protocol.connection_lost(None)

    return asyncio.run(main())


def _answers(settings: Settings, raw: bytes, direct: bool, count: int = 1) -> tuple[list[Any], bool, Any]:
    async def scenario(connect: Any) -> tuple[list[Any], bool, Any]:
        protocol, transport = await connect(direct)
        protocol.data_received(raw)
        await until(lambda: transport.closed or len(responses(transport.data)) >= count, "the answers")
        await asyncio.sleep(0.01)  # nothing more may follow
        return responses(transport.data), transport.closed, protocol.cycle

    return _run(settings, scenario)  # type: ignore[no-any-return]


def _same(settings: Settings, raw: bytes, unread_closes: bool = False) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The one answer to ``raw``, asserted equal on both paths (but the date), and that it took the direct path.

    ``unread_closes``: the ASGI path refuses before reading the body and closes the connection, so that
    the rest of the body is not read; the direct path has read the body already and keeps it open.
    """
    direct, direct_closed, cycle = _answers(settings, raw, True)
    asgi, asgi_closed, _ = _answers(settings, raw, False)
    assert isinstance(cycle, _DirectCycle)
    assert len(direct) == len(asgi) == 1
    for answer in (direct[0], asgi[0]):
        answer[1].pop(b"date", None)
    if unread_closes:
        assert asgi_closed and asgi[0][1].pop(b"connection") == b"close"
        assert not direct_closed and b"connection" not in direct[0][1]
    else:
        assert direct_closed == asgi_closed
    assert direct[0] == asgi[0]
    return direct[0]  # type: ignore[no-any-return]


BINARY, HEADER_LENGTH = _binary_body()
CASES = {
    "json": _post("/v2/models/classifier/infer", JSON_BODY),
    "binary": _post("/v2/models/classifier/infer", BINARY, f"Inference-Header-Content-Length: {HEADER_LENGTH}\r\n"),
    "version": _post("/v2/models/classifier/versions/1/infer", JSON_BODY),
    "predict": _post("/v1/models/classifier:predict", json.dumps({"instances": X}).encode()),
    "query-string": _post("/v2/models/classifier/infer?x=1", JSON_BODY),
    "malformed-json": _post("/v2/models/classifier/infer", b'{"inputs": ['),
    "wrong-datatype": _post("/v2/models/classifier/infer", JSON_BODY.replace(b"FP32", b"INT8")),
    "unknown-model": _post("/v2/models/nope/infer", JSON_BODY),
    "unknown-version": _post("/v2/models/classifier/versions/9/infer", JSON_BODY),
    "not-ready": _post("/v2/models/tampered/infer", JSON_BODY),
    "bad-header-length": _post("/v2/models/classifier/infer", BINARY, "Inference-Header-Content-Length: 99999\r\n"),
    "connection-close": _post("/v2/models/classifier/infer", JSON_BODY, "Connection: close\r\n"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_answers_equal_the_asgi_path(settings: Settings, case: str) -> None:
    status, headers, body = _same(settings, CASES[case])
    expected = {"json": 200, "binary": 200, "version": 200, "predict": 200, "query-string": 200,
                "connection-close": 200, "malformed-json": 400, "wrong-datatype": 400, "bad-header-length": 400,
                "unknown-model": 404, "unknown-version": 404, "not-ready": 503}[case]
    assert status.startswith(b"HTTP/1.1 %d " % expected), (status, body)
    if expected != 200:
        assert json.loads(body)["error"]
    assert (headers.get(b"connection") == b"close") == (case == "connection-close")


def test_the_direct_answer_is_the_model_output(settings: Settings) -> None:
    _, headers, body = _same(settings, CASES["binary"])
    length = int(headers[b"inference-header-content-length"])
    header = json.loads(body[:length])
    out = np.frombuffer(body[length:], np.float32).reshape(header["outputs"][0]["shape"])
    _, _, reference = _same(settings, CASES["json"])
    expected = np.asarray(json.loads(reference)["outputs"][0]["data"], np.float32).reshape(out.shape)
    np.testing.assert_array_equal(out, expected)  # the same model run, two encodings


@pytest.mark.parametrize(("key", "authorization", "status"), [
    pytest.param("s3cret", "", 401, id="missing"), pytest.param("s3cret", "Bearer nope", 401, id="wrong"),
    pytest.param("s3cret", "Bearer s3cret", 200, id="right")])
def test_the_api_key_is_checked_on_the_direct_path(repository: Path, key: str, authorization: str,
                                                    status: int) -> None:
    settings = Settings(model_repository=repository, intra_op_threads=1, api_key=SecretStr(key))
    extra = f"Authorization: {authorization}\r\n" if authorization else ""
    answer = _same(settings, _post("/v2/models/classifier/infer", JSON_BODY, extra), unread_closes=status == 401)
    assert answer[0].startswith(b"HTTP/1.1 %d " % status)
    if status == 401:
        assert answer[1][b"www-authenticate"] == b"Bearer"
        assert key.encode() not in answer[2]


@pytest.mark.parametrize("raw", [
    pytest.param(_post("/v2/models/classifier/infer", JSON_BODY, "Expect: 100-continue\r\n"), id="expect"),
    pytest.param(b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(JSON_BODY) + JSON_BODY + b"\r\n0\r\n\r\n", id="chunked"),
    pytest.param(_post("/v2/models/classifier/infer", JSON_BODY, "Content-Encoding: identity\r\n"),
                 id="content-encoding"),
    pytest.param(_post("/v2/models/classifier/infer", JSON_BODY).replace(b"Content-Length", b"CONTENT-ENCODING: "
                                                                         b"identity\r\nContent-Length", 1),
                 id="content-encoding-before-the-length"),
    pytest.param(_post("/v2/models/classifier/infer", JSON_BODY).replace(b"HTTP/1.1", b"HTTP/1.0", 1), id="http-1.0"),
    pytest.param(_post("/v2/models/classifie%72/infer", JSON_BODY), id="percent-encoded"),
    pytest.param(_post("/v2/models/classifier/infer", b" " * DIRECT_BODY_BYTES + JSON_BODY), id="large-body"),
])
def test_what_the_direct_path_does_not_take_goes_through_asgi_and_is_served(settings: Settings, raw: bytes) -> None:
    answers, _, cycle = _answers(settings, raw, True)
    assert not isinstance(cycle, _DirectCycle)
    assert answers[0][0].startswith(b"HTTP/1.1 200 "), answers
    assert json.loads(answers[0][2])["outputs"][0]["shape"] == [2, 3]


@pytest.mark.parametrize("length", [b"Content-Length", b"content-LENGTH"])
def test_the_content_length_header_is_read_whatever_its_case_and_trailing_space(settings: Settings,
                                                                               length: bytes) -> None:
    raw = _post("/v2/models/classifier/infer", JSON_BODY).replace(b"Content-Length: %d" % len(JSON_BODY),
                                                                   length + b": %d  \t" % len(JSON_BODY), 1)
    answers, _, cycle = _answers(settings, raw, True)
    assert isinstance(cycle, _DirectCycle)
    assert answers[0][0].startswith(b"HTTP/1.1 200 "), answers


def test_what_kept_one_request_off_the_direct_path_does_not_keep_the_next(settings: Settings) -> None:
    """The headers' verdict is per request: a pipelined plain request after an encoded one is direct again."""
    async def scenario(connect: Any) -> tuple[list[Any], Any]:
        protocol, transport = await connect(True)
        protocol.data_received(_post("/v2/models/classifier/infer", JSON_BODY, "Content-Encoding: identity\r\n")
                               + _post("/v2/models/classifier/infer", JSON_BODY))
        await until(lambda: len(responses(transport.data)) >= 2, "both answers")
        return responses(transport.data), protocol.cycle

    answers, cycle = _run(settings, scenario)
    assert [a[0][:13] for a in answers] == [b"HTTP/1.1 200 "] * 2
    assert isinstance(cycle, _DirectCycle)


def test_pipelined_requests_are_answered_in_order(settings: Settings) -> None:
    """Direct, ASGI (a probe) and direct requests in one read: three answers, in the order asked."""
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    first = _post("/v2/models/classifier/infer", JSON_BODY.replace(b'"r1"', b'"first"'))
    last = _post("/v2/models/classifier/versions/2/infer", JSON_BODY.replace(b'"r1"', b'"last"'))
    answers, closed, _ = _answers(settings, first + probe + last + probe, True, count=4)
    assert not closed
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200"] * 4
    assert json.loads(answers[0][2])["id"] == "first"
    assert b"outputs" not in answers[1][2]
    assert json.loads(answers[2][2])["id"] == "last" and json.loads(answers[2][2])["model_version"] == "2"


def test_a_body_arriving_in_pieces_is_served(settings: Settings) -> None:
    raw = CASES["binary"]

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        for start in range(0, len(raw), 7):
            protocol.data_received(raw[start:start + 7])
            await asyncio.sleep(0)
        await until(lambda: bool(transport.data), "the answer")
        return responses(transport.data), protocol.cycle

    answers, cycle = _run(settings, scenario)
    assert isinstance(cycle, _DirectCycle)
    assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 200 ")


def test_a_stalled_direct_body_gets_408_from_the_limits(settings: Settings) -> None:
    raw = CASES["json"]

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(raw[:-5])  # the head and most of the body, then nothing
        await until(lambda: transport.closed or bool(transport.data), "the refusal", seconds=30)
        return transport.data, protocol.cycle

    data, cycle = _run(settings, scenario, HttpLimits(16384, 0.5, 0.2))
    assert isinstance(cycle, _DirectCycle) and cycle.disconnected
    assert data.startswith(b"HTTP/1.1 408 ") and b"BNFOLD_BODY_TIMEOUT_S" in data


def test_a_client_gone_before_its_answer_gets_nothing_and_the_server_goes_on(settings: Settings) -> None:
    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(CASES["json"])
        protocol.connection_lost(None)  # before the answer's task ran
        await asyncio.sleep(0.05)
        written_after_loss = transport.data
        again, again_transport = await connect(True)
        again.data_received(CASES["json"])
        await until(lambda: bool(again_transport.data), "the next answer")
        return written_after_loss, responses(again_transport.data)

    written, answers = _run(settings, scenario)
    assert written == b""
    assert answers[0][0].startswith(b"HTTP/1.1 200 ")


def test_shutdown_lets_an_inflight_direct_request_finish_then_closes(settings: Settings) -> None:
    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(CASES["json"])
        protocol.shutdown()  # as uvicorn does on SIGTERM: the answer still goes out, then the connection closes
        await until(lambda: transport.closed, "the close")
        return responses(transport.data)

    answers = _run(settings, scenario)
    assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 200 ")
    assert answers[0][1][b"connection"] == b"close"


def test_the_direct_path_counts_metrics_like_the_asgi_path(settings: Settings) -> None:
    async def scenario(connect: Any) -> Any:
        for direct in (True, False):
            protocol, transport = await connect(direct)
            protocol.data_received(CASES["json"] + CASES["malformed-json"])
            await until(lambda t=transport: len(responses(t.data)) >= 2, "the answers")  # type: ignore[misc]
        protocol, transport = await connect(False)
        protocol.data_received(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        await until(lambda: bool(responses(transport.data)), "the metrics")
        return responses(transport.data)[0][2].decode()

    text = _run(settings, scenario)
    assert 'bnfold_requests_total{model="classifier",outcome="success"} 2.0' in text
    assert 'bnfold_requests_total{model="classifier",outcome="invalid_input"} 2.0' in text


def test_a_fragment_is_routed_as_the_asgi_path_routes_it(settings: Settings) -> None:
    """``#...`` is not part of the path (uvicorn's URL parser drops it): the direct path must not route on it."""
    raw = _post("/v2/models/classifier#/infer", JSON_BODY)
    direct, _, cycle = _answers(settings, raw, True)
    asgi, _, _ = _answers(settings, raw, False)
    assert not isinstance(cycle, _DirectCycle)
    assert direct[0][0] == asgi[0][0] and direct[0][2] == asgi[0][2]


def test_a_trickled_direct_body_gets_408_at_the_request_deadline(repository: Path) -> None:
    """Each pause is under the body timeout, but the whole body takes longer than ``request_timeout_s``:
    408 and close, as on the ASGI path, instead of a connection held for as long as the client likes."""
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    raw = CASES["json"]

    async def scenario(connect: Any) -> Any:
        results = []
        for direct in (True, False):
            protocol, transport = await connect(direct)
            protocol.data_received(raw[:-20])
            for byte in range(len(raw) - 20, len(raw) - 1):  # one byte per 0.05 s, never the last one
                if transport.data or transport.closed:
                    break
                protocol.data_received(raw[byte:byte + 1])
                await asyncio.sleep(0.05)
            await until(lambda t=transport: bool(t.data), "the refusal")  # type: ignore[misc]
            results.append(responses(transport.data)[0])
        protocol, transport = await connect(False)
        protocol.data_received(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        await until(lambda: bool(responses(transport.data)), "the metrics")
        assert 'bnfold_http_errors_total{status="408"} 2.0' in responses(transport.data)[0][2].decode()
        return results

    direct, asgi = _run(settings, scenario, HttpLimits(16384, 30.0, 30.0))
    for answer in (direct, asgi):
        assert answer[0].startswith(b"HTTP/1.1 408 "), answer
        assert answer[1][b"connection"] == b"close"
    assert json.loads(direct[2]) == json.loads(asgi[2])


def test_an_invalid_request_behind_a_direct_one_in_flight_writes_nothing_after_the_close(
        settings: Settings) -> None:
    """A pipelined request httptools cannot parse gets uvicorn's 400 and a close, in its turn: after the
    answer of the request before it, still running (which uvicorn would write after that close)."""
    raw = CASES["json"] + b"GARBAGE\r\n\r\n"
    loop_errors: list[Any] = []

    async def scenario(connect: Any) -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
        out = []
        for direct in (True, False):
            protocol, transport = await connect(direct)
            protocol.data_received(raw)
            await until(lambda t=transport: t.closed, "the close")  # type: ignore[misc]
            await until(lambda p=protocol: not p.tasks, "the request's end")  # type: ignore[misc]
            out.append(responses(transport.data))
        return out

    for answers in _run(settings, scenario):
        assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 400"]
    assert loop_errors == []


def test_a_client_gone_after_unparsable_bytes_gets_nothing_written(settings: Settings) -> None:
    """The 400 waits behind the running request; a disconnect then reaches that request: nothing is written."""
    async def scenario(connect: Any) -> Any:
        out = []
        for direct in (True, False):
            protocol, transport = await connect(direct)
            protocol.data_received(CASES["json"] + b"GARBAGE\r\n\r\n")
            protocol.connection_lost(None)
            written: list[bytes] = []
            transport.write = written.append  # type: ignore[method-assign,assignment]
            await until(lambda p=protocol: not p.tasks, "the request's end")  # type: ignore[misc]
            await asyncio.sleep(0.01)
            out.append(transport.data + b"".join(written))
        return out

    assert _run(settings, scenario) == [b"", b""]


def test_a_request_cancelled_by_a_forced_shutdown_gets_500_and_a_close(settings: Settings) -> None:
    """Past uvicorn's graceful shutdown timeout it cancels the requests still running: an ASGI one gets
    uvicorn's 500 and a close, and so must a direct one (not silence on an open connection)."""
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        out = []
        for direct in (True, False):
            protocol, transport = await connect(direct)
            entry = _direct_app(protocol.app).state.service.repository.get("classifier")
            original = entry.batcher._run
            entry.batcher._run = lambda feeds, run=original: (release.wait(30), run(feeds))[1]
            try:
                protocol.data_received(CASES["json"])
                await until(lambda p=protocol: bool(p.tasks), "the request's start")  # type: ignore[misc]
                await asyncio.sleep(0.05)
                protocol.shutdown()
                for task in list(protocol.tasks):
                    task.cancel()
                await until(lambda p=protocol: not p.tasks, "the request's end")  # type: ignore[misc]
            finally:
                entry.batcher._run = original
            out.append((responses(transport.data), transport.closed))
        release.set()
        return out

    try:
        for answers, closed in _run(settings, scenario):
            assert [a[0][:12] for a in answers] == [b"HTTP/1.1 500"] and closed
    finally:
        release.set()


def test_a_direct_request_past_its_deadline_gets_the_asgi_paths_504_and_its_budget_back(repository: Path) -> None:
    settings = Settings(model_repository=repository, intra_op_threads=1, request_timeout_s=0.3)
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        out = []
        for direct in (True, False):
            protocol, transport = await connect(direct)
            app = _direct_app(protocol.app)
            entry = app.state.service.repository.get("classifier")
            original = entry.batcher._run
            entry.batcher._run = lambda feeds, run=original: (release.wait(30), run(feeds))[1]
            try:
                protocol.data_received(CASES["json"])
                await until(lambda t=transport: t.closed, "the 504")  # type: ignore[misc]
                await until(lambda p=protocol: not p.tasks, "the request's end")  # type: ignore[misc]
            finally:
                entry.batcher._run = original
            out.append((responses(transport.data), app.endpoints.budget.used))
        release.set()
        return out

    try:
        (direct, direct_used), (asgi, asgi_used) = _run(settings, scenario)
    finally:
        release.set()
    for answers in (direct, asgi):
        answers[0][1].pop(b"date", None)
    assert direct == asgi and direct[0][0].startswith(b"HTTP/1.1 504 ")
    assert json.loads(direct[0][2])["error"] == "the request did not finish within 0.3 s (BNFOLD_REQUEST_TIMEOUT_S)"
    assert direct_used == asgi_used == 0


def test_an_unparsable_chunk_in_the_body_being_read_gets_400_at_once(settings: Settings) -> None:
    """The bytes httptools cannot parse are the running request's own body: its 400 cannot wait for an
    answer to that request (which would wait for the rest of the body): it goes out now, and closes."""
    raw = (b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\n{\"inp\r\nZZ\r\n")
    answers, closed, _ = _answers(settings, raw, True)
    assert closed and [a[0][:12] for a in answers] == [b"HTTP/1.1 400"]


def test_many_pipelined_requests_refused_at_once_are_answered_in_order_without_recursion(
        settings: Settings) -> None:
    """Errors found while the parser's callback runs (404 here) are written from the next loop iteration:
    finishing each inside the callback would start the next pipelined request from within it, recursively."""
    count = 1500  # well past the interpreter's recursion limit, were each answer to start the next one inline
    good = CASES["json"]  # in flight while the others are parsed and queued behind it
    raw = good + _post("/v2/models/nope/infer", JSON_BODY) * count + good
    loop_errors: list[Any] = []

    async def scenario(connect: Any) -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
        protocol, transport = await connect(True)
        protocol.data_received(raw)
        await until(lambda: len(responses(transport.data)) == count + 2, "the answers", 120)
        app = _direct_app(protocol.app)
        return responses(transport.data), transport.closed, app.endpoints.budget.used, protocol.tasks

    answers, closed, used, tasks = _run(settings, scenario)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200"] + [b"HTTP/1.1 404"] * count + [b"HTTP/1.1 200"]
    assert not closed and used == 0 and not tasks
    assert loop_errors == []


def test_a_request_refused_at_once_returns_its_lease_and_budget(settings: Settings) -> None:
    """A bad Inference-Header-Content-Length is found before the request is queued: nothing stays held."""
    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(CASES["bad-header-length"])
        await until(lambda: bool(responses(transport.data)), "the answer")
        app = _direct_app(protocol.app)
        entry = app.state.service.repository.get("classifier")
        return responses(transport.data), app.endpoints.budget.used, entry.inflight

    answers, used, inflight = _run(settings, scenario)
    assert answers[0][0].startswith(b"HTTP/1.1 400 ") and used == 0 and inflight == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "asgi"])
def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_not_before(settings: Settings,
                                                                                  direct: bool) -> None:
    """The keep-alive timeout is checked by the protocol's one lazy timer (uvicorn arms one per response)."""
    keep_alive = 0.3

    async def scenario(connect: Any) -> Any:
        loop = asyncio.get_running_loop()
        protocol, transport = await connect(direct)
        idle = []
        for _ in range(2):  # a second request on the kept connection: the first idle spell did not close it
            answered = len(responses(transport.data))
            protocol.data_received(CASES["json"])
            await until(lambda n=answered: len(responses(transport.data)) > n, "the answer")  # type: ignore[misc]
            idle.append(loop.time())
            assert not transport.closed
        await until(lambda: transport.closed, "the keep-alive close")
        return responses(transport.data), loop.time() - idle[-1]

    answers, idle_for = _run(settings, scenario, keep_alive_s=keep_alive)
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200"] * 2
    assert idle_for >= keep_alive * 0.99  # closed by the timeout, not before it
    assert idle_for < 10  # by the keep-alive timeout, not by the 30 s ones of the limits


def test_a_request_running_past_the_keep_alive_timeout_is_answered_on_its_open_connection(
        settings: Settings) -> None:
    keep_alive = 0.2
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        entry = _direct_app(protocol.app).state.service.repository.get("classifier")
        original = entry.batcher._run
        entry.batcher._run = lambda feeds, run=original: (release.wait(30), run(feeds))[1]
        try:
            protocol.data_received(CASES["json"])
            await until(lambda: bool(protocol.tasks), "the request's start")
            await asyncio.sleep(3 * keep_alive)  # the request runs for longer than the keep-alive timeout
            closed_while_running = transport.closed
            release.set()
            await until(lambda: bool(responses(transport.data)), "the answer")
        finally:
            entry.batcher._run = original
        return closed_while_running, responses(transport.data)

    try:
        closed_while_running, answers = _run(settings, scenario, keep_alive_s=keep_alive)
    finally:
        release.set()
    assert not closed_while_running
    assert answers[0][0].startswith(b"HTTP/1.1 200 ")


class _ScopeEcho:
    """An ASGI app answering with the scope it got; ``POST /direct`` is served on the direct path."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.scopes.append({k: v for k, v in scope.items() if k not in ("app", "extensions")})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def direct_route(self, path: str) -> Any:
        if path != "/direct":
            return None
        return (lambda path, params, headers, body, respond: respond((200, b"direct", [])), {})


def test_an_asgi_request_gets_uvicorns_scope_though_the_direct_path_builds_none() -> None:
    """The scope is built only off the direct path: an ASGI request after direct ones (pipelined, split
    across reads, with an Expect header) gets the very scope uvicorn's own protocol gives it."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    get = (b"GET /echo/a%20b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nX-One: 1\r\nX-Two: two\r\n\r\n"
           b"POST /other HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
    direct = _post("/direct", b"{}", "X-Direct: yes\r\n")
    raw = direct + get + direct
    pieces = [raw[:len(direct) + 7], raw[len(direct) + 7:len(direct) + 40], raw[len(direct) + 40:]]

    async def scopes(cls: type[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
        app = _ScopeEcho()
        config = Config(app=app, access_log=False, log_level="warning", lifespan="off")
        config.load()
        options = {"limits": HttpLimits(16384, 30.0, 30.0)} if cls is LimitedHttpToolsProtocol else {}
        protocol = cls(config, ServerState(), {"shared": 1}, asyncio.get_running_loop(), **options)
        if cls is HttpToolsProtocol:  # uvicorn's own: the direct request is an ASGI one for it
            app.direct_route = lambda path: None  # type: ignore[method-assign]
        transport = FakeTransport(strict=False)
        protocol.connection_made(transport)
        for piece in pieces:
            protocol.data_received(piece)
            await asyncio.sleep(0.01)
        await until(lambda: len(responses(transport.data)) == 4, "the four answers")
        protocol.connection_lost(None)
        return app.scopes, [r[2] for r in responses(transport.data)]

    async def main() -> Any:
        return await scopes(LimitedHttpToolsProtocol), await scopes(HttpToolsProtocol)

    (ours, our_bodies), (uvicorns, _) = asyncio.run(main())
    assert our_bodies == [b"direct", b"ok", b"ok", b"direct"]
    assert ours == uvicorns[1:3]  # uvicorn's saw the two direct requests too
    assert ours[0]["path"] == "/echo/a b" and ours[0]["query_string"] == b"x=1&y=2"
    assert ours[0]["headers"] == [(b"host", b"h"), (b"x-one", b"1"), (b"x-two", b"two")]
    assert ours[0]["state"] == {"shared": 1}


def _held(protocol: LimitedHttpToolsProtocol, release: threading.Event) -> Callable[[], None]:
    """Make the model's runs wait for ``release``; returns the undo."""
    entry = _direct_app(protocol.app).state.service.repository.get("classifier")
    original = entry.batcher._run
    entry.batcher._run = lambda feeds, run=original: (release.wait(30), run(feeds))[1]

    def undo() -> None:
        entry.batcher._run = original
    return undo


PIPELINED_REFUSALS = {
    # (the bytes after the running request, in one read and then the next; the limits; the refusal)
    "over the header limit, complete in the same read": (
        [_post("/v2/health/live", b"", "X-Big: " + "a" * 2000 + "\r\n")], HttpLimits(1024, 30.0, 30.0), 431),
    "over the header limit while it streams": (
        [b"GET /v2/health/live HTTP/1.1\r\nX-Big: ", b"a" * 2000], HttpLimits(1024, 30.0, 30.0), 431),
    "a head that stops arriving": ([b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n"], HttpLimits(16384, 0.3, 30.0), 408),
}


@pytest.mark.parametrize("case", list(PIPELINED_REFUSALS))
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "asgi"])
def test_a_pipelined_request_refused_by_the_limits_waits_for_the_answer_before_it(
        settings: Settings, case: str, direct: bool) -> None:
    """A refusal for a request pipelined behind one still running no longer takes that one's answer: the
    200 comes first, then the refusal and the close (as uvicorn's own 400 for unparsable bytes does)."""
    reads, limits, status = PIPELINED_REFUSALS[case]
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(direct)
        undo = _held(protocol, release)
        try:
            protocol.data_received(CASES["json"] + reads[0])
            await until(lambda: bool(protocol.tasks), "the first request's start")
            for more in reads[1:]:
                protocol.data_received(more)
            await asyncio.sleep(0.6)  # past the 0.3 s header timeout, with the first request still running
            written_while_running = transport.data
            release.set()
            await until(lambda: len(responses(transport.data)) >= 2, "both answers")
            await until(lambda: transport.closed, "the close", seconds=30)
        finally:
            undo()
        return written_while_running, responses(transport.data)

    try:
        written_while_running, answers = _run(settings, scenario, limits)
    finally:
        release.set()
    assert written_while_running == b""
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 %d" % status]
    assert len(json.loads(answers[0][2])["outputs"][0]["data"]) == 2 * 3  # the classifier's logits, 2 rows
    assert answers[1][1][b"connection"] == b"close" and json.loads(answers[1][2])["error"]


HEAD_REFUSALS = {
    "a head that stops arriving": (b"HEAD /v2/health/live HTTP/1.1\r\nHost: a\r\n", HttpLimits(16384, 0.2, 30.0)),
    "over the header limit": (b"HEAD /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 2000, HttpLimits(1024, 30.0, 30.0)),
}


@pytest.mark.parametrize("case", list(HEAD_REFUSALS))
def test_a_head_request_refused_by_the_limits_gets_no_body(settings: Settings, case: str) -> None:
    """A response to HEAD has no body (RFC 9110 9.3.2), a refusal too: its head says the length it would have."""
    raw, limits = HEAD_REFUSALS[case]

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(raw)
        await until(lambda: bool(transport.data), "the refusal", seconds=30)
        await asyncio.sleep(0.05)
        return transport.data

    data = _run(settings, scenario, limits)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 431 ")) and rest == b"", data
    assert int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])[b"content-length"]) > 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "asgi"])
def test_a_pipelined_body_that_stalls_gets_its_408_after_the_answer_before_it(settings: Settings, direct: bool) -> None:
    """A request queued behind a running one whose body stops arriving is refused in its turn: the running
    request's reading resumes its connection's reads, so the stall is timed, but its answer comes first."""
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(direct)
        undo = _held(protocol, release)
        try:
            stalled = _post("/v2/models/classifier/infer", JSON_BODY)[:-10]
            protocol.data_received(CASES["json"] + stalled)
            await until(lambda: bool(protocol.tasks), "the first request's start")
            await asyncio.sleep(0.6)  # past the 0.3 s body timeout, with the first request still running
            written_while_running = transport.data
            release.set()
            await until(lambda: len(responses(transport.data)) >= 2, "both answers")
        finally:
            undo()
        return written_while_running, responses(transport.data)

    try:
        written_while_running, answers = _run(settings, scenario, HttpLimits(16384, 0.3, 0.3))
    finally:
        release.set()
    assert written_while_running == b""
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 408"]
    assert b"BNFOLD_BODY_TIMEOUT_S" in answers[1][2]


OVERSIZED_THEN_GARBAGE = _post("/v2/health/live", b"", "X-Big: " + "a" * 2000 + "\r\n") + b"\x00garbage\r\n\r\n"


def test_unparsable_bytes_after_a_refused_head_get_no_second_answer(settings: Settings) -> None:
    """The 431 is the connection's last answer: a 400 for what follows it in the same read is not written."""
    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        protocol.data_received(OVERSIZED_THEN_GARBAGE)
        await asyncio.sleep(0.05)
        return responses(transport.data)

    answers = _run(settings, scenario, HttpLimits(1024, 30.0, 30.0))
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 431"]


def test_a_deferred_refusal_followed_by_unparsable_bytes_still_passes_a_disconnect_on(settings: Settings) -> None:
    """Behind a running request, the 431 waits its turn; the garbage after it adds nothing, and a client that
    leaves then still reaches the running request (its answer is not written to a closed connection)."""
    release = threading.Event()

    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(True)
        undo = _held(protocol, release)
        try:
            protocol.data_received(CASES["json"] + OVERSIZED_THEN_GARBAGE)
            await until(lambda: bool(protocol.tasks), "the first request's start")
            running = protocol.cycle.before  # type: ignore[attr-defined]
            protocol.connection_lost(None)
            disconnected = running.disconnected
            release.set()
            await until(lambda: not protocol.tasks, "the request's end")
        finally:
            undo()
        return disconnected, transport.data, transport.late_writes

    try:
        disconnected, data, late_writes = _run(settings, scenario, HttpLimits(1024, 30.0, 30.0))
    finally:
        release.set()
    assert disconnected and data == b"" and late_writes == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "asgi"])
def test_a_body_timeout_shorter_than_the_header_timeout_is_kept(settings: Settings, direct: bool) -> None:
    """The connection's one timer was armed for the header timeout at connect; a body that stalls is still
    refused at its own, shorter timeout, not at that later check."""
    async def scenario(connect: Any) -> Any:
        protocol, transport = await connect(direct)
        began = asyncio.get_running_loop().time()
        protocol.data_received(CASES["json"][:-5])
        await until(lambda: bool(transport.data), "the refusal", seconds=60)
        return transport.data, asyncio.get_running_loop().time() - began

    data, took = _run(settings, scenario, HttpLimits(16384, 60.0, 0.3))
    assert data.startswith(b"HTTP/1.1 408 ") and b"BNFOLD_BODY_TIMEOUT_S" in data
    assert took < 30  # by the 0.3 s body timeout, not the 60 s header timeout's check


@pytest.mark.parametrize(("url", "path"), [
    (b"/v2/models/m/infer", "/v2/models/m/infer"),
    (b"/v2/models/m/infer?x=%41", "/v2/models/m/infer"),  # escapes in the query are not the path's
    (b"/v2/models/%6d/infer", None), (b"/v2/models/m/infer#f", None), (b"v2/models/m/infer", None),
    ("/v2/models/é/infer".encode(), None),
])
def test_a_request_targets_verdict_is_the_same_when_remembered(url: bytes, path: str | None) -> None:
    http_protocol._direct_paths.clear()
    assert http_protocol._direct_path(url) == path
    assert http_protocol._direct_paths[url] == path  # what the next request to it finds


def test_the_remembered_request_targets_are_bounded() -> None:
    http_protocol._direct_paths.clear()
    for k in range(3 * http_protocol.DIRECT_PATHS_KEPT):
        http_protocol._direct_path(b"/v2/models/m%d/infer" % k)
    assert 0 < len(http_protocol._direct_paths) <= http_protocol.DIRECT_PATHS_KEPT
    long = b"/" + b"a" * http_protocol.TARGET_BYTES_KEPT
    assert http_protocol._direct_path(long) == long.decode() and long not in http_protocol._direct_paths
