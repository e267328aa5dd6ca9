"""HTTP-level limits of a real ``python -m service`` process (uvicorn + service.protocol): header size,
header and body read timeouts, and the server-wide byte budget. Raw sockets, so nothing in between
(no client library) shapes the bytes; every wait has a generous deadline for a loaded machine.
"""

from __future__ import annotations

import email.utils
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import free_port, is_ready, start, stop, wait_until

pytestmark = pytest.mark.slow
TIMEOUT_S = 2  # the test server's header and body timeouts
BUDGET = 1_000_000  # the test server's max_inflight_bytes
INFER = b"/v2/models/classifier/infer"
SMALL = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_LOG_LEVEL": "error",
           "BNFOLD_HEADER_TIMEOUT_S": str(TIMEOUT_S), "BNFOLD_BODY_TIMEOUT_S": str(TIMEOUT_S),
           "BNFOLD_MAX_INFLIGHT_BYTES": str(BUDGET)}
    process = start(env)
    try:
        wait_until(process, lambda: is_ready(f"http://127.0.0.1:{port}"), "readiness")
        yield "127.0.0.1", port
    finally:
        stop(process)


def _connect(server: tuple[str, int]) -> socket.socket:
    return socket.create_connection(server, timeout=30)


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s at most)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path, len(body), extra, body)


def _error(answer: bytes) -> str:
    body = answer.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["error"])


def _live(server: tuple[str, int]) -> int:
    return httpx.get(f"http://{server[0]}:{server[1]}/v2/health/live", timeout=30).status_code


# ---- header size ----------------------------------------------------------------------------

def test_a_1_mib_header_gets_431_and_the_connection_closes(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert _error(answer) == "the request line and headers exceed 16384 bytes (BNFOLD_MAX_HEADER_BYTES)"
    _assert_default_headers(answer)
    assert _live(server) == 200


def test_a_header_over_the_limit_that_arrives_in_one_read_gets_431(server: tuple[str, int]) -> None:
    """Complete in one packet with its body: the exact size is checked when the head is complete."""
    with _connect(server) as sock:
        sock.sendall(_post(INFER, SMALL, b"X-Big: " + b"a" * 20_000 + b"\r\n"))
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert "over the limit of 16384 (BNFOLD_MAX_HEADER_BYTES)" in _error(answer)


def test_a_large_body_in_the_same_read_as_the_headers_is_not_mistaken_for_headers(server: tuple[str, int]) -> None:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1000, 4],
                                   "data": [0.25] * 4000}]}).encode()
    assert len(body) > 16384
    with _connect(server) as sock:
        sock.sendall(_post(INFER, body, b"Connection: close\r\n"))
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_an_endless_header_is_cut_off_while_probes_stay_fast(server: tuple[str, int]) -> None:
    latencies: list[float] = []
    statuses: list[int] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            began = time.monotonic()
            statuses.append(_live(server))
            latencies.append(time.monotonic() - began)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    sent = 0
    try:
        with _connect(server) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            deadline = time.monotonic() + 30
            with pytest.raises(OSError):  # the server closes the connection: broken pipe or reset
                while time.monotonic() < deadline:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
    finally:
        time.sleep(0.5)
        done.set()
        prober.join(60)
    assert sent < 64 * 1024 * 1024  # 16 KiB of header, 2 MiB dropped while closing, socket buffers
    assert statuses and set(statuses) == {200}
    assert max(latencies) < 5, latencies  # kubelet's probe timeout is 3 s; before the limit: up to 7 s


# ---- read timeouts --------------------------------------------------------------------------

def test_headers_that_stop_arriving_get_408(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and the blank line never comes
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert _error(answer) == f"the request line and headers did not arrive within {TIMEOUT_S} s " \
                             "(BNFOLD_HEADER_TIMEOUT_S)"
    _assert_default_headers(answer)


def _assert_default_headers(answer: bytes) -> None:
    """A refusal written by the protocol carries the date and server headers of every other answer (RFC 9110
    requires a date on a 4xx from a server with a clock)."""
    head = answer.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")[1:]
    names = [line.partition(b":")[0] for line in head]
    assert names.count(b"date") == 1 and names.count(b"server") == 1, head
    date = next(line for line in head if line.startswith(b"date:")).partition(b":")[2].strip()
    assert email.utils.parsedate_to_datetime(date.decode()).tzinfo is not None, date


def test_a_connection_that_sends_nothing_is_closed(server: tuple[str, int]) -> None:
    began = time.monotonic()
    with _connect(server) as sock:
        assert _answer(sock) == b""
    assert time.monotonic() - began < 25  # closed by the server (TIMEOUT_S), not by the 30 s socket timeout


def test_a_body_that_stalls_gets_408_and_the_connection_closes(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"" % INFER)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert _error(answer) == f"the request body paused for more than {TIMEOUT_S} s (BNFOLD_BODY_TIMEOUT_S)"
    _assert_default_headers(answer)


def test_a_body_sent_slowly_but_steadily_is_served(server: tuple[str, int]) -> None:
    request = _post(INFER, SMALL, b"Connection: close\r\n")
    head, body = request[:-len(SMALL)], SMALL
    with _connect(server) as sock:
        sock.sendall(head)
        for start in range(0, len(body), 20):
            time.sleep(TIMEOUT_S / 5)
            sock.sendall(body[start:start + 20])
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


# ---- the byte budget ------------------------------------------------------------------------

def test_stalled_uploads_cannot_hold_more_than_the_budget(server: tuple[str, int]) -> None:
    declared = 600_000  # two of them would pass BUDGET
    stalled = _connect(server)
    try:
        stalled.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (INFER, declared))
        time.sleep(0.2)
        with _connect(server) as sock:  # refused from its Content-Length, before any of it is read
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (INFER, declared))
            answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        assert f"needs {declared}, over BNFOLD_MAX_INFLIGHT_BYTES={BUDGET}; retry later" in _error(answer)
        with _connect(server) as sock:  # a small request still fits beside the stalled one
            sock.sendall(_post(INFER, SMALL, b"Connection: close\r\n"))
            assert _answer(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        stalled.close()
    deadline = time.monotonic() + 30  # the server notices the close, or times the body out, and frees its share
    while True:
        with _connect(server) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
                INFER, declared) + b" " * declared)
            answer = _answer(sock)
        if not answer.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]  # admitted (and then an empty JSON document)
