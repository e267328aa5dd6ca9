"""The direct path of :mod:`service.protocol` in a real ``python -m service`` process, over raw sockets:
what only a real server shows (uvicorn's access log, a real transport's close)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from server_process import free_port, is_ready, log_text, start, stop, wait_until

pytestmark = pytest.mark.slow
SMALL = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()


def _post(body: bytes = SMALL, extra: bytes = b"", length: int | None = None) -> bytes:
    return b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body) if length is None else length, extra, body)


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _statuses(data: bytes) -> list[bytes]:
    """The status codes of the answers in ``data``, in order (split by their content-length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        out.append(lines[0][9:12])
        length = next(int(line[16:]) for line in lines if line.lower().startswith(b"content-length: "))
        data = rest[length:]
    return out


def test_access_log_and_pipelined_order_on_a_real_server(repository: Path) -> None:
    """With ``BNFOLD_ACCESS_LOG=true`` every inference request is logged (the direct path is off then);
    without it, unparsable bytes after a body get their 400 after the answer before them, on a real socket."""
    for access_log in ("true", "false"):
        port = free_port()
        env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(repository), "BNFOLD_PORT": str(port),
               "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_LOG_LEVEL": "info",
               "BNFOLD_ACCESS_LOG": access_log}
        process = start(env)
        try:
            wait_until(process, lambda p=port: is_ready(f"http://127.0.0.1:{p}"), "readiness")  # type: ignore[misc]
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(_post() + _post() + _post(SMALL + b"GARBAGE\r\n\r\n", length=len(SMALL)))
                statuses = _statuses(_until_closed(sock))
            assert statuses == [b"200", b"200", b"200", b"400"]
            if access_log == "true":
                deadline = time.monotonic() + 30
                while log_text(process).count('"POST /v2/models/classifier/infer HTTP/1.1\\" 200') < 3:
                    assert time.monotonic() < deadline, log_text(process)[-2000:]
                    time.sleep(0.1)
        finally:
            stop(process)
