"""The HTTP/1.1 protocol uvicorn runs: its httptools protocol plus a header size limit and read timeouts.

uvicorn (0.29 to 0.5x) has neither for httptools, which the service uses for speed (``h11`` has
``h11_max_incomplete_event_size`` but answers 400 and parses several times slower). Without them
one connection streaming an endless header grows httptools' buffer without bound (and stalls the
event loop re-joining it: 7 s probe latency measured), and a client that stops sending holds its
connection, and its half-read body, forever. :class:`LimitedHttpToolsProtocol` adds, per connection:

* **431** when the request line and headers pass ``max_header_bytes``: while they are still
  arriving (counted from the bytes fed while the head is incomplete) and, exactly, once they are
  complete (only computed when the fed bytes say it could be over, so a normal request pays nothing);
* **408** and close when the request line and headers are not complete ``header_timeout_s`` after
  they started (a fresh connection that sends nothing is closed silently after the same time);
* **408** and close when a request body pauses longer than ``body_timeout_s`` (not counting time
  in which the server itself stopped reading, flow control);

all before the app, so before the API key check. Idle keep-alive connections are closed after
uvicorn's ``timeout_keep_alive``. After a refusal the connection is closed *lingering*: the answer
is followed by a FIN, and what the client still sends is read and dropped, up to
:data:`LINGER_BYTES` or :data:`LINGER_S`, so that a client that sends its whole request before
reading (curl, httpx) gets the 431 instead of a reset. One timer per connection, armed only when a
message is incomplete after a read or a response leaves the connection idle, checks every timeout
lazily: under load a connection arms about one per keep-alive timeout, where uvicorn arms one per
response. :func:`protocol_factory` binds the limits; the factory pickles, so ``--workers`` spawns it.

For speed, a response's status line and headers are written together with its first body part
(:class:`_OneWriteCycle`): uvicorn writes them as two ``transport.write`` calls, i.e. two ``send``
system calls and two TCP segments per small response, which the client reads in two wake-ups.

*The direct path.* An inference request that the app routes directly (``app.direct_route(path)``,
:class:`service.api.fastpath.ServiceApp`) is answered without ASGI: no scope, middleware,
``receive``/``send`` messages or response-cycle object; the body is collected as it is parsed, the
handler gets (path, path parameters, headers, body, ``respond``) and returns at once; the answer it
gives ``respond`` (from the batch's callback: no task, future or ``await`` per request) leaves in one
``write`` with uvicorn's default headers. At most :data:`DIRECT_BODY_BYTES` of body, so it holds no more per
connection than uvicorn's own buffer would. It takes only plain requests: ``POST``, HTTP/1.1, a
``Content-Length`` (no chunked body, no ``Content-Encoding``, no ``Expect: 100-continue``, no
upgrade), a path without percent-escapes or fragment, under uvicorn's concurrency limit, and no
access log (written by the ASGI path only); anything else goes through ASGI as before. Pipelining,
disconnects, shutdown and this module's timeouts see a :class:`_DirectCycle` where uvicorn keeps its
cycle; the app's request deadline (``direct_timeout_s``) bounds the body's arrival, as on the ASGI
path. Under load it cut the server's CPU per request by a fifth for a small model (``benchmarks/serving.py``).

Bytes that httptools cannot parse get uvicorn's 400 and a close after the answers to the requests
pipelined before them (:meth:`LimitedHttpToolsProtocol.send_400_response`), on either path; so does a
pipelined request whose head breaks a limit (its 431, or its 408): the request still running before it
gets its answer first (:class:`_Refusal`). A refusal of a ``HEAD`` request is its head alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.logs import event

# Message states of one connection.
_IDLE, _HEAD, _BODY = 0, 1, 2
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_BYTES = 2 * 1024 * 1024  # dropped after a refusal before the connection is closed
LINGER_S = 2.0  # longest a refused connection stays open
# Largest body the direct path reads before answering: what uvicorn buffers per connection before it pauses
# reading (HIGH_WATER_LIMIT), so a stalled upload holds no more on the direct path than on the ASGI one.
DIRECT_BODY_BYTES = HIGH_WATER_LIMIT
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, body, headers besides content-length
Respond = Callable[[Answer | None], None]  # takes a request's answer (None: nobody to answer), once
# (path, path parameters, headers, body, respond): returns at once; ``respond`` gets the answer later or now.
DirectHandler = Callable[[str, dict[str, str], list[tuple[bytes, bytes]], bytes, Respond], None]
_CONNECTION_CLOSE = (b"connection", b"close")
_NOT_DIRECT = -1  # LimitedHttpToolsProtocol._length of a request whose headers keep it off the direct path
_CODINGS = (b"transfer-encoding", b"content-encoding")  # headers that keep a request off the direct path
TARGET_BYTES_KEPT = 256  # longest request target whose verdict is remembered
DIRECT_PATHS_KEPT = 256  # request targets whose direct-path verdict is remembered (cleared when full)
_direct_paths: dict[bytes, str | None] = {}  # request target -> its path, or None: not for the direct path
_INTERNAL_ERROR: Answer = (500, b'{"error":"internal server error"}', [(b"content-type", b"application/json")])


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int  # request line + header names and values (+4 bytes each for ": " and CRLF)
    header_timeout_s: float  # from the first byte of a request (or the connection) to the end of its headers
    body_timeout_s: float  # longest pause between two parts of a request body


class _Answered:
    """Stands in for uvicorn's request cycle of a refused request: the parser's callbacks for the rest
    of the message (``on_body``, ``on_message_complete``) see a request already answered and drop it."""

    response_started = response_complete = disconnected = True
    more_body = False

    def __init__(self) -> None:
        self.message_event = asyncio.Event()


class _Refusal(_Answered):
    """Stands in for a request refused while the answers before it are pending (pipelined): httptools could
    not parse it (:meth:`LimitedHttpToolsProtocol.send_400_response`), or its head broke a limit. Its answer,
    ``write()``, waits its turn, so the requests before it still get theirs."""

    response_started = response_complete = disconnected = False

    def __init__(self, write: Callable[[], None], before: Any) -> None:
        super().__init__()
        self.write = write
        self.before = before  # the request parsed last: a disconnect reaches it, as uvicorn's would


class _NoEvent:
    """What uvicorn and the limits set on a cycle's ``message_event``; a direct cycle has no reader to wake."""

    def set(self) -> None:
        pass


class _DirectCycle:
    """A request served by the direct path: its route, head and body parts, and the state uvicorn's
    protocol reads and writes on ``self.cycle`` (pipelining, disconnects, shutdown, the limits' timers)."""

    response_started = response_complete = disconnected = False
    more_body = True
    started = False  # its turn came (no earlier response pending on the connection)
    message_event = _NoEvent()

    deadline = float("inf")  # loop time by which the body must have arrived (the app's request deadline)

    def __init__(self, handler: DirectHandler, path: str, params: dict[str, str],
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, timeout_s: float | None) -> None:
        self.handler = handler
        self.path = path
        self.params = params
        self.headers = headers
        self.keep_alive = keep_alive
        self.timeout_s = timeout_s  # the app's request deadline (BNFOLD_REQUEST_TIMEOUT_S), if it has one
        self.body: list[bytes] = []
        self.respond: Respond | None = None  # set while the handler has the request

    def cancel(self, msg: Any = None) -> None:
        """uvicorn's forced shutdown (past its graceful timeout) cancels running requests: an ASGI one gets
        its 500 and a close, and so does this one, which is then answered; the handler's answer is dropped."""
        respond = self.respond
        if respond is not None and not self.response_complete:  # written from the next loop iteration: uvicorn
            status, payload, extra = _INTERNAL_ERROR  # iterates over its task set (this cycle's) while it cancels
            asyncio.get_running_loop().call_soon(respond, (status, payload, [*extra, _CONNECTION_CLOSE]))


def _direct_app(app: Any) -> Any:
    """The object with ``direct_route`` under uvicorn's middleware wrappers (``.app``), or ``None``."""
    for _ in range(8):
        if hasattr(app, "direct_route"):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class _HeadBuffer:
    """Stands in for the transport while uvicorn writes: keeps the bytes (and a close) for one ``write``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.head.append(data)

    def close(self) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Any:  # close(), is_closing(), ...: the real transport's
        return getattr(self.transport, name)


class _OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle, writing the response head and the first body part as one ``write``.

    The head waits only until the app's next ``send``: a response is never held longer than the app
    itself takes; should the app fail in between, uvicorn closes the connection as it does after a head.
    """

    _head: bytes = b""

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            transport = self.transport
            buffer = _HeadBuffer(transport)
            self.transport = buffer  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._head = b"".join(buffer.head)
            return
        head = self._head
        if head and message["type"] == "http.response.body" and not self.disconnected:
            self._head = b""
            transport = self.transport
            first = _HeadBuffer(transport)
            self.transport = first  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            transport.write(b"".join([head, *first.head]))
            if first.closed:  # uvicorn closed the connection after the body: now that it is written
                transport.close()
            return
        await super().send(message)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HttpLimits` (see the module docstring)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: HttpLimits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._state = _IDLE
        self._fed = 0  # bytes fed since the current request's head started (an upper bound of its size)
        self._head_started: float | None = None  # loop time the unfinished head (or the connection) started
        self._body_seen = 0.0  # loop time body bytes last arrived
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._dropped = 0  # bytes read and dropped after a refusal
        self._handling = False  # a direct request's handler is running (inside the parser's callbacks)
        self._length: int | None = None  # the request's Content-Length (None: none yet; _NOT_DIRECT)
        self._idle_since: float | None = None  # loop time the last response completed with nothing pipelined
        # The direct path (see the module docstring): off with access logging, which only the ASGI path writes.
        self._direct = None if self.access_log else _direct_app(config.loaded_app)
        self._direct_timeout_s: float | None = getattr(self._direct, "direct_timeout_s", None)

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started = self.loop.time()  # a connection that never sends a request is closed too
        self._arm(self._head_started + self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cycle = self.cycle
        if type(cycle) is _Refusal and not cycle.before.response_complete:
            cycle.before.disconnected = True
            cycle.before.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        state = self._state
        if state != _BODY:  # these bytes start or continue a request head
            self._fed += len(data)
        super().data_received(data)
        state = self._state
        if state == _IDLE or self._refused:
            return
        now = self.loop.time()
        if state == _HEAD:
            if self._fed > self.limits.max_header_bytes:
                self._refuse(431, f"the request line and headers exceed {self.limits.max_header_bytes} bytes "
                                  "(BNFOLD_MAX_HEADER_BYTES)", later=True)
                return
            if self._head_started is None:
                self._head_started = now
            due = self._head_started + self.limits.header_timeout_s
        else:
            self._body_seen = now
            due = now + self.limits.body_timeout_s
            cycle = self.cycle
            if type(cycle) is _DirectCycle and cycle.deadline < due:  # the request deadline comes first
                due = cycle.deadline
        timer = self._timer
        if timer is None:
            self._arm(due)
        elif timer.when() > due:  # armed for a later check (keep-alive, a longer header timeout): this one first
            timer.cancel()
            self._arm(due)

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timeout checked by this protocol's one lazy timer: uvicorn arms a
        timer per response (``call_later``, cancelled by the next request: 3 us a response with uvloop)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = now = self.loop.time()
        due = now + self.timeout_keep_alive
        timer = self._timer
        if timer is None or timer.when() > due:  # none armed, or for a later check (a fresh connection's)
            if timer is not None:
                timer.cancel()
            self._arm(due)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's 400 for bytes httptools cannot parse, and a close; in its turn, after the answers to the
        requests before those bytes (pipelined, either path), which uvicorn would write after the close.
        Bytes inside the body of the request parsed last get it at once: that request's answer waits for them."""
        if self._refused:  # bytes after a refusal in the same read: that refusal is the connection's last answer
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            super().send_400_response(msg)
            return
        self._refused = True  # the parser is broken: what follows is read and dropped
        self._defer(functools.partial(self._send_unparsable, msg), cycle)

    def _defer(self, write: Callable[[], None], before: Any) -> None:
        """Write a refusal once the answers pending before it are written (:class:`_Refusal`)."""
        self.cycle = _Refusal(write, before)  # type: ignore[assignment]
        self.pipeline.appendleft((self.cycle, None))  # type: ignore[arg-type]

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """uvicorn's, without the ASGI scope, which only the ASGI path needs: :meth:`_asgi_scope` builds it."""
        self._state = _HEAD
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        """uvicorn's, noting on the way what the direct path asks of the headers (one valid ``Content-Length``,
        no transfer or content coding), so that :meth:`_start_direct` need not scan them again."""
        name = name.lower()
        value = value.rstrip(b" \t")  # (llhttp keeps trailing whitespace, which RFC 9110 5.5 excludes)
        if name == b"content-length":  # a second one, or one after a coding, is _NOT_DIRECT
            self._length = int(value) if self._length is None and value.isdigit() and len(value) <= 18 \
                else _NOT_DIRECT
        elif name in _CODINGS:
            self._length = _NOT_DIRECT
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _asgi_scope(self) -> None:
        """uvicorn's scope of this request (its ``on_message_begin``), keeping the URL and headers parsed since."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def on_headers_complete(self) -> None:
        self._state = _BODY
        self._head_started = None
        if self._refused:  # a request pipelined behind a refused one, in the same read
            return
        fed = self._fed
        limit = self.limits.max_header_bytes
        if fed > limit or fed == 0:  # the read that completed the head was big, or it began mid-read (pipelining)
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limit:
                self._refuse(431, f"the request line and headers have {size} bytes, over the limit of {limit} "
                                  "(BNFOLD_MAX_HEADER_BYTES)", later=True)
                if type(self.cycle) is not _Refusal:  # (a deferred refusal drops the rest of the message too)
                    self.cycle = _Answered()  # type: ignore[assignment]
                return
        if self._start_direct():
            return
        self._asgi_scope()
        super().on_headers_complete()
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:  # its task has not started yet: it will call _OneWriteCycle.send
            cycle.__class__ = _OneWriteCycle

    def on_body(self, body: bytes) -> None:
        if self._refused:  # the rest of a refused request (its answer may wait its turn: _Refusal)
            return
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            cycle.body.append(body)  # at most DIRECT_BODY_BYTES: the parser stops at Content-Length
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._state = _IDLE
        self._fed = 0
        if self._refused:
            return
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            cycle.more_body = False
            if cycle.started:
                self._run_direct(cycle)
            return
        super().on_message_complete()

    # -- the direct path -----------------------------------------------------------------------

    def _start_direct(self) -> bool:
        """Take this request onto the direct path if it qualifies (see the module docstring)."""
        direct = self._direct
        parser = self.parser
        if direct is None:
            return False
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or self.expect_100_continue \
                or parser.should_upgrade():
            return False
        length = self._length
        if length is None or length < 0 or length > DIRECT_BODY_BYTES:
            return False
        url = self.url
        path = _direct_paths.get(url, _UNSEEN)
        if path is _UNSEEN:
            path = _direct_path(url)
        if path is None:
            return False
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False  # uvicorn answers 503
        route = direct.direct_route(path)
        if route is None:
            return False
        handler, params = route
        cycle = _DirectCycle(handler, path, params, self.headers, parser.should_keep_alive(), self._direct_timeout_s)
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._begin_direct(cycle)
        else:  # pipelined behind a response still pending: uvicorn starts it after that one (on_response_complete)
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]
        return True

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if type(cycle) is _Refusal:  # the answers before it are complete (_OneWriteCycle writes right after)
            cycle.response_complete = True
            self.loop.call_soon(cycle.write)
            return
        if type(cycle) is _DirectCycle:  # a pipelined direct request whose turn came
            self._begin_direct(cycle)
            if not cycle.more_body:
                self._run_direct(cycle)
            return
        super()._start_asgi_task(cycle, app)

    def _send_unparsable(self, message: str) -> None:
        if not self.transport.is_closing():
            super().send_400_response(message)

    def _begin_direct(self, cycle: _DirectCycle) -> None:
        """Its turn came: its deadline runs from now, as an ASGI request's from the start of its task."""
        cycle.started = True
        if cycle.timeout_s is not None:
            cycle.deadline = self.loop.time() + cycle.timeout_s

    def _run_direct(self, cycle: _DirectCycle) -> None:
        """Hand the request to its handler. The cycle counts as one of uvicorn's running tasks until answered:
        shutdown waits for it, and past the graceful timeout cancels it (:meth:`_DirectCycle.cancel`)."""
        body = cycle.body[0] if len(cycle.body) == 1 else b"".join(cycle.body)
        cycle.body = []
        cycle.respond = respond = functools.partial(self._direct_answer, cycle)  # dropped once answered
        self.tasks.add(cycle)  # type: ignore[arg-type]
        self._handling = True
        try:
            cycle.handler(cycle.path, cycle.params, cycle.headers, body, respond)
        except Exception as exc:  # a bug in the handler: what uvicorn does for an ASGI app, with the service's body
            event(logging.ERROR, "internal error", path=cycle.path, error=f"{type(exc).__name__}: {exc}")
            respond(_INTERNAL_ERROR)
        finally:
            self._handling = False

    def _direct_answer(self, cycle: _DirectCycle, answer: Answer | None) -> None:
        """Write a direct request's answer (its :data:`Respond`), unless it was answered or its client left.

        An answer given while the handler still runs (an error found at once) is written from the next loop
        iteration: the handler runs inside the parser's callbacks, where finishing a response would start the
        next pipelined request (recursively, for many of them) and arm the keep-alive timer mid-request.
        """
        if self._handling:
            self.loop.call_soon(self._direct_answer, cycle, answer)
            return
        self.tasks.discard(cycle)  # type: ignore[arg-type]
        if cycle.response_complete:  # answered already: cancelled by the forced shutdown
            return
        cycle.respond = None
        if answer is None:  # nobody to answer
            cycle.response_complete = True
            self.transport.close()
            return
        if cycle.disconnected:
            return
        if self.flow.write_paused:  # the client is not reading its earlier answers: write once it does
            task = self.loop.create_task(self._write_drained(cycle, answer))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return
        self._write_direct(cycle, answer)

    async def _write_drained(self, cycle: _DirectCycle, answer: Answer) -> None:
        await self.flow.drain()
        if not cycle.disconnected:
            self._write_direct(cycle, answer)

    def _write_direct(self, cycle: _DirectCycle, answer: Answer) -> None:
        """The answer in one ``write``: status line, uvicorn's default headers, the answer's, and its body."""
        status, payload, extra = answer
        parts = [STATUS_LINE[status], _default_head(self.server_state.default_headers),
                 b"content-length: %d\r\n" % len(payload)]
        for name, value in extra:
            if name == b"connection" and value == b"close":
                cycle.keep_alive = False
                continue
            parts += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", payload]
        cycle.response_started = True
        self.transport.write(b"".join(parts))
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    # -- timeouts ------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._timer = self.loop.call_at(when, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        idle = self._idle_since
        if idle is not None:  # nothing arrived since the last response: uvicorn's keep-alive timeout
            due = idle + self.timeout_keep_alive
            if now < due:
                self._arm(due)
            else:
                self.transport.close()
            return
        if self._head_started is not None:  # a head (or a first request) is awaited
            due = self._head_started + self.limits.header_timeout_s
            if now < due:
                self._arm(due)
            elif self._state == _HEAD:
                self._refuse(408, "the request line and headers did not arrive within "
                                  f"{self.limits.header_timeout_s:g} s (BNFOLD_HEADER_TIMEOUT_S)", later=True)
            else:  # nothing of a request arrived: close quietly, as uvicorn's keep-alive timeout does
                self.transport.close()
            return
        cycle = self.cycle
        if self._state != _BODY or cycle is None or not cycle.more_body:
            return
        deadline = float("inf")
        if type(cycle) is _DirectCycle:
            deadline = cycle.deadline
            if now >= deadline:  # the ASGI path's answer (service.api.fastpath), whose deadline covers the body
                self._refuse(408, self._direct.direct_late())
                return
        if self.flow.read_paused:  # the server stopped reading (the app is busy): not the client's pause
            self._arm(min(now + self.limits.body_timeout_s, deadline))
            return
        due = self._body_seen + self.limits.body_timeout_s
        if now < due:
            self._arm(min(due, deadline))
        elif cycle.response_started:  # the app answered already (a 413, say): only the connection is left
            self._refused = True
            self.transport.close()
        else:
            self._refuse(408, f"the request body paused for more than {self.limits.body_timeout_s:g} s "
                              "(BNFOLD_BODY_TIMEOUT_S)")

    def _refuse(self, status: int, message: str, later: bool = False) -> None:
        """Answer ``status`` with a JSON error body (its head only, to a ``HEAD`` request) and close; the app
        (if it runs) sees a disconnect. With ``later`` the refused request is one after :attr:`cycle` (its head
        is what broke the limit), whose answer, still pending, is written first (:class:`_Refusal`); so is the
        answer of a request still running when the refused one (its body stalled) is queued behind it."""
        self._refused = True
        cycle = self.cycle
        head_only = bool(self.url) and self.parser.get_method() == b"HEAD"  # (its method is parsed once its URL is)
        write = functools.partial(self._write_refusal, status, message, head_only)
        if later and cycle is not None and not cycle.response_complete:
            self.flow.pause_reading()
            self._defer(write, cycle)
            return
        pipeline = self.pipeline
        for index, (queued, _) in enumerate(pipeline):  # the refused request waits behind one still running
            if queued is cycle:
                cycle.disconnected = True  # it never starts: its refusal takes its turn instead
                refusal = _Refusal(write, cycle)
                pipeline[index] = (refusal, None)  # type: ignore[assignment]
                self.cycle = refusal  # type: ignore[assignment]
                return
        busy = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # its receive() returns http.disconnect, its send() writes nothing
            cycle.message_event.set()
        if busy:  # never interleave with a response being written: just close
            self.transport.close()
            return
        write()

    def _write_refusal(self, status: int, message: str, head_only: bool) -> None:
        transport = self.transport
        if transport.is_closing():  # (a deferred refusal whose client left)
            return
        body = orjson.dumps({"error": message})  # with the date and server headers of every other answer
        transport.write(b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n"
                        b"connection: close\r\n\r\n%s" % (status, _REASONS[status],
                                                          _default_head(self.server_state.default_headers),
                                                          len(body), b"" if head_only else body))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)


_UNSEEN: Any = object()


def _direct_path(url: bytes) -> str | None:
    """The path of request target ``url`` when the direct path may take it (remembered in :data:`_direct_paths`
    for targets of at most :data:`TARGET_BYTES_KEPT` bytes), else ``None``: escapes and a fragment are left to
    uvicorn's URL parser, which makes the ASGI path."""
    query = url.find(b"?")
    raw_path = url if query < 0 else url[:query]
    path = None if b"%" in raw_path or b"#" in raw_path or not raw_path.isascii() or not raw_path.startswith(b"/") \
        else raw_path.decode("ascii")
    if len(url) <= TARGET_BYTES_KEPT:
        if len(_direct_paths) >= DIRECT_PATHS_KEPT:
            _direct_paths.clear()
        _direct_paths[url] = path
    return path


_head_of: tuple[Any, bytes] = (None, b"")  # the last default headers seen, and their bytes


def _default_head(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default response headers (``server``, ``date``, ``--header``s) as bytes. uvicorn sets a new list
    each second (the date): the bytes are built once per list, not once per response."""
    global _head_of
    seen, head = _head_of
    if seen is not headers:
        head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
        _head_of = (headers, head)
    return head


def protocol_factory(limits: HttpLimits) -> Any:
    """What uvicorn's ``http=`` takes: a callable building :class:`LimitedHttpToolsProtocol` with ``limits``."""
    return functools.partial(LimitedHttpToolsProtocol, limits=limits)
