"""Start and stop a real ``python -m service`` process in tests, robustly on a loaded machine.

A server that has bound its port may still refuse or stall connections while its workers import and load
models, so readiness is polled with retries until a deadline; the deadline is generous because a busy
2-core CI machine can take tens of seconds to start two interpreters.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

import httpx
import pytest

START_DEADLINE_S = 120.0  # start-up on a loaded 2-core machine; an idle one takes 2-5 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(env: Mapping[str, str], preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """``python -m service`` in its own session (so its workers can be stopped together), stdout discarded.

    Its stderr goes to a temporary file, not a pipe: nobody reads a pipe while the tests run, and a
    server that logs more than the pipe holds would block. ``preexec_fn`` runs in the child before it
    starts (e.g. to set resource limits).
    """
    log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the server; stop() closes it)
    process = subprocess.Popen([sys.executable, "-m", "service"], env=dict(env), stdout=subprocess.DEVNULL,
                               stderr=log, start_new_session=True, preexec_fn=preexec_fn)
    process.log = log  # type: ignore[attr-defined]
    return process


def log_text(process: subprocess.Popen[bytes]) -> str:
    """What the server wrote to stderr so far."""
    log = process.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")


def _exited(process: subprocess.Popen[bytes]) -> str:
    return f"the server exited with {process.returncode}:\n{log_text(process)[-4000:]}"


def wait_until(process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str,
               deadline_s: float = START_DEADLINE_S) -> None:
    """Poll ``ready()`` every 0.1 s until it is true; fail if the server exits or ``deadline_s`` passes.

    Connection errors and timeouts count as "not yet": the port may be bound before anyone accepts on it.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            pytest.fail(_exited(process))
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {deadline_s:.0f} s")
        time.sleep(0.1)


def is_ready(url: str) -> bool:
    return httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it after 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.log.close()  # type: ignore[attr-defined]
