"""Closed-loop HTTP load generator: ``c`` keep-alive connections, each sending the next POST as soon as
the previous response arrived; reports requests/s and p50/p99 latency.

Two implementations with the same result format:

* ``wrk`` (Debian's package; compiled, one thread, a Lua script sets the POST body and headers and
  prints the summary as JSON). :func:`ensure_wrk` installs it with apt-get when it is missing and
  the benchmark runs as root;
* a Python asyncio fallback (uvloop when installed), used when wrk is not available.

Either runs pinned to its own CPUs (``taskset``) so that it does not compete with the server. Its
own ceiling is measured against :func:`serve_trivial`, an HTTP endpoint that answers every request
with a fixed 2-byte body (httptools parser on a raw asyncio protocol: near the cheapest HTTP
server Python can run), and reported with the results.

Run as a script: ``python benchmarks/loadgen.py URL --body FILE -c 8 -d 2`` (asyncio generator) or
``python benchmarks/loadgen.py --serve-trivial PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Load:
    """One closed-loop run: ``concurrency`` connections for ``seconds``."""

    generator: str  # "wrk" or "asyncio"
    concurrency: int
    seconds: float
    requests: int
    errors: int  # non-2xx responses, connection errors, timeouts
    rps: float
    p50_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_wrk(install: bool = True) -> str | None:
    """Path of ``wrk``; installs Debian's package when missing, allowed and running as root."""
    found = shutil.which("wrk")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(cmd, env=env, capture_output=True, check=False, timeout=300)
        if shutil.which("wrk"):
            break
    return shutil.which("wrk")


_LUA = """\
local f = assert(io.open(%(body)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests": %%d, "duration_us": %%d, "p50_us": %%.1f, "p99_us": %%.1f, ' ..
    '"errors": %%d}\\n', summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for these characters


def run_wrk(url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float,
            cpus: set[int] | None = None, wrk: str = "wrk") -> Load:
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA % {"body": _lua_string(str(body_path)), "headers": lines})
        cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
               url]
        if cpus:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    r = json.loads(line[6:])
    duration = r["duration_us"] / 1e6
    ok = r["requests"] - r["errors"]
    return Load("wrk", concurrency, duration, r["requests"], r["errors"], ok / duration, r["p50_us"] / 1e3,
                r["p99_us"] / 1e3)


# ---------------------------------------------------------------------------------------------
# asyncio fallback


def _request_bytes(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    head = [f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
            f"Host: {parts.hostname}:{parts.port}", f"Content-Length: {len(body)}",
            *[f"{k}: {v}" for k, v in headers.items()]]
    return parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _connection(host: str, port: int, request: bytes, stop: float, latencies: list[float],
                      errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 300:
                errors[0] += 1
    finally:
        writer.close()


async def _run_asyncio(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> Load:
    host, port, request = _request_bytes(url, body, headers)
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter()
    results = await asyncio.gather(
        *[_connection(host, port, request, start + seconds, latencies, errors) for _ in range(concurrency)],
        return_exceptions=True)
    elapsed = time.perf_counter() - start
    errors[0] += sum(1 for r in results if isinstance(r, BaseException))
    if not latencies:
        raise RuntimeError(f"no response from {url}: {[r for r in results if isinstance(r, BaseException)][:1]}")
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return Load("asyncio", concurrency, elapsed, len(latencies), errors[0], (len(latencies) - errors[0]) / elapsed,
                q[49] * 1e3, q[98] * 1e3)


def run_asyncio(url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float,
                cpus: set[int] | None = None) -> Load:
    """The asyncio generator in a subprocess pinned to ``cpus`` (so it never shares the caller's CPU)."""
    with tempfile.NamedTemporaryFile(suffix=".body") as fh:
        fh.write(body)
        fh.flush()
        cmd = [sys.executable, str(Path(__file__).resolve()), url, "--body", fh.name, "-c", str(concurrency),
               "-d", str(seconds), "--headers", json.dumps(headers)]
        if cpus:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-800:]}")
    return Load(**json.loads(done.stdout.strip().splitlines()[-1]))


def run_load(generator: str, url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float,
             cpus: set[int] | None = None) -> Load:
    if generator == "wrk":
        return run_wrk(url, body, headers, concurrency=concurrency, seconds=seconds, cpus=cpus)
    return run_asyncio(url, body, headers, concurrency=concurrency, seconds=seconds, cpus=cpus)


# ---------------------------------------------------------------------------------------------
# the trivial endpoint


class _Trivial(asyncio.Protocol):
    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import httptools

        self.transport: Any = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(self.RESPONSE)


def serve_trivial(port: int, host: str = "127.0.0.1") -> None:
    """Answer every HTTP request with ``200 ok`` (the load generator's ceiling)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Trivial, host, port, backlog=1024))
    print("ready", flush=True)
    try:
        loop.run_until_complete(server.serve_forever())
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?")
    parser.add_argument("--body", type=Path, help="file with the POST body")
    parser.add_argument("--headers", default="{}", help="JSON object of extra headers")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--seconds", type=float, default=2.0)
    parser.add_argument("--serve-trivial", type=int, metavar="PORT", help="run the trivial endpoint instead")
    args = parser.parse_args(argv)
    if args.serve_trivial is not None:
        serve_trivial(args.serve_trivial)
        return 0
    if not args.url or args.body is None:
        parser.error("URL and --body are required")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    load = asyncio.run(_run_asyncio(args.url, args.body.read_bytes(), json.loads(args.headers), args.concurrency,
                                    args.seconds))
    print(json.dumps(load.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
