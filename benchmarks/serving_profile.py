"""Where a served request's CPU time goes: microseconds per request, stage by stage, and a live profile.

Two views of one batch-1 request (the serving benchmark's models and bodies):

* **Stages, timed in-process** (CPU time of the process, ``time.process_time``: what other processes on a
  shared machine take is not counted; median of rounds, one pinned CPU): each stage called
  on its own, in a loop, with the request the load generator sends --

  - *HTTP*: uvicorn's httptools protocol (with :mod:`service.protocol`'s limits) parsing the raw
    request bytes and taking it onto the direct path (no ASGI), and writing the answer of a trivial
    handler;
  - *auth, limits, body*: the fast path's API-key check, admission share and body read;
  - *JSON decode*: the parse of a JSON body as the service does it (:func:`service.codec.loads_body`:
    simdjson reads the tensor data of a large body, orjson the rest; 0 for the binary extension: the
    model's :class:`service.codec.Decoder` parses a header once, then remembers it);
  - *array building*: the rest of that decoder's work (checks, ``np.asarray`` or ``np.frombuffer``,
    finiteness);
  - *queueing + hand-off*: :meth:`service.batching.Batcher.submit` around a model that does nothing,
    on the worker thread (the first run of a model) and inline (:data:`service.batching.INLINE_S`);
  - *onnxruntime*: ``session.run`` of one row, with the service's session settings; also the median of
    single runs back to back and of runs each after a :data:`PAUSE_S` sleep (a server waits between
    requests at c=1, and a run after a wait is slower: caches and the core's idle state);
  - *response building*: :func:`service.codec.encode_infer_response` and the metrics update;
  - *whole request in-process*: all of the above through the real app, over the same protocol
    and a fake transport (everything but the socket system calls and the event loop's polling);

* **A live profile**: ``bnfold serve`` pinned to the server CPU under wrk load (``c`` connections),
  sampled by ``py-spy record`` (``--nonblocking``); the collapsed stacks are checked in and each
  sample is assigned to a stage by the frames it holds (the loop's own C code, polling and socket
  I/O included, is *socket I/O and event loop*). Server CPU per request comes from ``/proc/PID/stat``.
  The in-process *whole request* includes the loop that polls for its answer, so live minus
  in-process is no measure of the socket's cost and is not reported.

Run: ``python benchmarks/serving_profile.py`` (writes ``serving_profile.{md,json}`` and the py-spy
output ``serving_profile_<model>_<body>.txt`` / ``.svg`` under ``benchmarks/results``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, loadgen, serving

AFTER_PAUSE = "onnxruntime one row after a 0.1 ms pause (median)"
STAGES = ("HTTP (httptools, uvicorn, direct path)", "auth, limits, body", "JSON decode", "array building",
          "queueing + hand-off", "onnxruntime", "response building", "socket I/O and event loop")
# Live-profile stage of a sample: the first rule whose fragment is in one of its frames (innermost first).
RULES: tuple[tuple[str, str], ...] = (
    ("onnxruntime", "onnxruntime_inference_collection"), ("onnxruntime", "runtime.py"),
    ("response building", "encode_infer_response"), ("response building", "metrics.py"),
    ("response building", "prometheus_client"),
    ("JSON decode", "loads (service/codec.py"), ("JSON decode", "service/jsondata.py"),
    ("array building", "service/codec.py"),
    ("queueing + hand-off", "batching.py"), ("auth, limits, body", "body.py"), ("auth, limits, body", "deps.py"),
    ("auth, limits, body", "admission.py"), ("auth, limits, body", "fastpath.py"),
    ("auth, limits, body", "inference.py"),
    ("HTTP (httptools, uvicorn, direct path)", "uvicorn"), ("HTTP (httptools, uvicorn, direct path)", "protocol.py"),
    ("HTTP (httptools, uvicorn, direct path)", "starlette"),
)


PAUSE_S = 1e-4  # the wait before each run of "after a pause": about a c=1 round trip's idle time


def _median_wall_us(fn: Callable[[], Any], n: int, pause_s: float) -> float:
    """Median wall time of ``fn`` over ``n`` calls, each after sleeping ``pause_s`` (0: back to back)."""
    for _ in range(max(1, n // 10)):
        fn()
    times = []
    for _ in range(n):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _per_call_us(fn: Callable[[], Any], n: int, rounds: int) -> float:
    for _ in range(max(1, n // 10)):  # warm caches and allocators first
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - start) / n)
    return statistics.median(times) * 1e6


async def _per_call_us_async(fn: Callable[[], Awaitable[Any]], n: int, rounds: int) -> float:
    for _ in range(max(1, n // 10)):
        await fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            await fn()
        times.append((time.process_time() - start) / n)
    return statistics.median(times) * 1e6


class _Transport(asyncio.Transport):
    """Collects what the protocol writes; ``done`` is set when a whole response has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        self.done.set()

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _raw_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
            *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _protocol_us(app: Any, raw: bytes, n: int, rounds: int) -> float:
    """CPU per request of uvicorn's protocol (with the service's limits) feeding ``raw`` to ``app``."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.protocol import HttpLimits, LimitedHttpToolsProtocol

    config = Config(app=app, access_log=False, log_level="warning", lifespan="off")
    config.load()
    protocol = LimitedHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop(),
                                        limits=HttpLimits(16384, 30.0, 30.0))
    transport = _Transport()
    protocol.connection_made(transport)

    async def one() -> None:
        transport.done.clear()
        protocol.data_received(raw)
        while not transport.done.is_set() or protocol.cycle is None or not protocol.cycle.response_complete:
            await asyncio.sleep(0)

    try:
        return await _per_call_us_async(one, n, rounds)
    finally:
        protocol.connection_lost(None)


class _TrivialApp:
    """An app whose every ``POST`` takes :mod:`service.protocol`'s direct path to a handler answering ``ok``."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # ASGI: what is not direct
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def direct_route(self, path: str) -> tuple[Callable[..., None], dict[str, str]]:
        def handler(path: str, params: dict[str, str], headers: Any, body: bytes, respond: Any) -> None:
            respond((200, b"ok", []))  # at once: the protocol writes it from the next loop iteration

        return handler, {}


def in_process(repo: Path, model: serving.Model, encoding: str, n: int, rounds: int) -> dict[str, float]:
    """Microseconds per request of each in-process stage, for ``model`` with ``encoding`` bodies."""
    from service import codec
    from service.api.admission import Budget, Share
    from service.api.deps import check_api_key
    from service.batching import Batcher
    from service.config import Settings
    from service.main import create_app
    from service.runtime import ModelRuntime

    body, headers = model.oip_binary() if encoding == "binary" else model.oip_json()
    length = int(headers["Inference-Header-Content-Length"]) if encoding == "binary" else None
    runtime = ModelRuntime(model.onnx, threads=1)
    settings = Settings(model_repository=repo, log_level="warning")  # type: ignore[call-arg]
    limits = codec.Limits(settings.max_request_rows, settings.max_tensor_elements, settings.max_tensor_bytes,
                          settings.max_json_bytes)
    decoder = runtime.decoder(limits)  # as served: a binary request's header is parsed once, then remembered
    request = decoder.decode(body, length)
    outputs = dict(zip(runtime.output_names, runtime.run(request.inputs), strict=True))
    out: dict[str, float] = {}

    def auth() -> None:
        check_api_key(settings, b"")
        share = Share(Budget(settings.max_inflight_bytes))
        share.take(len(body))
        share.release()

    out["auth, limits, body"] = _per_call_us(auth, n, rounds)
    out["JSON decode"] = _per_call_us(lambda: codec.loads_body(body), n, rounds) if length is None else 0.0
    decode = _per_call_us(lambda: decoder.decode(body, length), n, rounds)
    out["array building"] = max(0.0, decode - out["JSON decode"])
    out["onnxruntime"] = _per_call_us(lambda: runtime.run(request.inputs), n, rounds)
    out["onnxruntime one row, back to back (median)"] = _median_wall_us(lambda: runtime.run(request.inputs), n, 0.0)
    out[AFTER_PAUSE] = _median_wall_us(lambda: runtime.run(request.inputs), n, PAUSE_S)
    rows32 = {"input": np.concatenate([request.inputs["input"]] * 32)}
    out["onnxruntime per row, batch of 32"] = _per_call_us(lambda: runtime.run(rows32), max(1, n // 32), rounds) / 32
    app = create_app(settings)
    metrics = app.state.service.metrics

    def respond() -> None:
        codec.encode_infer_response(model.name, "1", request, outputs, runtime.outputs)
        metrics.request(model.name, "success", 1e-4)

    out["response building"] = _per_call_us(respond, n, rounds)

    async def served() -> dict[str, float]:
        got: dict[str, float] = {}
        for label, inline in (("thread", 0.0), ("inline", 1.0)):
            batcher = Batcher("profile", lambda feeds: [feeds["input"]], batches=True, max_batch_size=64,
                              max_queue_delay_s=0.0, max_queue_size=64, inline_s=inline)
            feeds = {"input": request.inputs["input"]}
            await batcher.submit(feeds)  # the first run sets the per-row estimate
            got[label] = await _per_call_us_async(functools.partial(batcher.submit, feeds), n, rounds)
            batcher.close()
        got["HTTP (httptools, uvicorn, direct path)"] = await _protocol_us(_TrivialApp(), _raw_request("/", b"", {}),
                                                                           n, rounds)
        async with app.router.lifespan_context(app):
            raw = _raw_request(f"/v2/models/{model.name}/infer", body, headers)
            got["whole request in-process"] = await _protocol_us(app, raw, n, rounds)
        return got

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    got = runner(served())
    out["queueing + hand-off"] = got["inline"]
    out["queueing + hand-off, worker thread"] = got["thread"]
    out["HTTP (httptools, uvicorn, direct path)"] = got["HTTP (httptools, uvicorn, direct path)"]
    out["whole request in-process"] = got["whole request in-process"]
    return out


# ---------------------------------------------------------------------------------------------
# the live profile


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of all threads, in clock ticks


def live(repo: Path, model: serving.Model, encoding: str, concurrency: int, seconds: float, out: Path,
         py_spy: str | None) -> dict[str, Any]:
    """Serve ``repo`` pinned to the server CPU, load it with wrk, profile it with py-spy; stage shares."""
    port = serving.free_port()
    env = {"BNFOLD_MODEL_REPOSITORY": str(repo), "BNFOLD_PORT": str(port), "BNFOLD_HOST": "127.0.0.1",
           "BNFOLD_LOG_LEVEL": "warning"}
    body, headers = model.oip_binary() if encoding == "binary" else model.oip_json()
    url = f"http://127.0.0.1:{port}/v2/models/{model.name}/infer"
    stem = out / f"serving_profile_{model.name}_{encoding}"
    result: dict[str, Any] = {"model": model.name, "encoding": encoding, "concurrency": concurrency}
    with serving.server([sys.executable, "-m", "service"], f"http://127.0.0.1:{port}/v2/health/ready", env=env,
                        log=common.CACHE / "serving-profile" / "server.log") as proc:
        loadgen.run_wrk(url, body, headers, concurrency=concurrency, seconds=1, cpus=serving.GENERATOR_CPUS)
        before = _ticks(proc.pid)
        load = loadgen.run_wrk(url, body, headers, concurrency=concurrency, seconds=seconds,
                               cpus=serving.GENERATOR_CPUS)
        cpu_us = (_ticks(proc.pid) - before) / os.sysconf("SC_CLK_TCK") / max(1, load.requests) * 1e6
        result.update(rps=load.rps, p50_ms=load.p50_ms, server_cpu_us_per_request=cpu_us)
        if py_spy is not None:
            shares = collections.Counter[str]()
            with tempfile.TemporaryDirectory() as tmp:
                for fmt, path in (("raw", Path(tmp) / "raw.txt"), ("flamegraph", stem.with_suffix(".svg"))):
                    spy = subprocess.Popen(serving._taskset(serving.GENERATOR_CPUS, [
                        py_spy, "record", "--nonblocking", "-r", "250", "-d", str(round(seconds)), "-f", fmt,
                        "-o", str(path), "-p", str(proc.pid)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    loadgen.run_wrk(url, body, headers, concurrency=concurrency, seconds=seconds + 1,
                                    cpus=serving.GENERATOR_CPUS)
                    spy.wait(timeout=60)
                raw = (Path(tmp) / "raw.txt").read_text()
            stacks, unparsed = parse_collapsed(raw)
            stem.with_suffix(".txt").write_text(
                "\n".join(f"{stack} {count}" for stack, count in stacks[:400]) + "\n")  # the heaviest stacks
            for stack, count in stacks:
                shares[classify(stack.split(";"))] += count
            total = sum(shares.values())
            result["profile_shares"] = {k: v / total for k, v in shares.most_common()}
            result["profile_samples"] = total
            result["profile_unparsed_lines"] = unparsed
    return result


def live_floor(model: serving.Model, encoding: str, seconds: float, checks: bool = False) -> dict[str, float]:
    """Server CPU per request at c=32 and c=1, and the c=1 p50, of the Python floor (``oip_floor.py``: the least
    work an OIP server can do, onnxruntime included; with ``checks``, ``--checks``: plus ``bnfold serve``'s
    per-request checks) for ``model`` with ``encoding`` bodies."""
    port = serving.free_port()
    body, headers = model.oip_binary() if encoding == "binary" else model.oip_json()
    command = [sys.executable, str(common.BENCH / "oip_floor.py"), *(["--checks"] if checks else []), str(port),
               f"{model.name}={model.onnx}"]
    log = common.CACHE / "serving-profile" / ("floor-checks.log" if checks else "floor.log")
    with serving.server(command, f"http://127.0.0.1:{port}/", log=log) as proc:
        url = f"http://127.0.0.1:{port}/v2/models/{model.name}/infer"
        loadgen.run_wrk(url, body, headers, concurrency=32, seconds=1, cpus=serving.GENERATOR_CPUS)
        found: dict[str, float] = {}
        for c, suffix in ((32, ""), (1, "_c1")):
            before = _ticks(proc.pid)
            load = loadgen.run_wrk(url, body, headers, concurrency=c, seconds=seconds, cpus=serving.GENERATOR_CPUS)
            found["server_cpu_us_per_request" + suffix] = \
                (_ticks(proc.pid) - before) / os.sysconf("SC_CLK_TCK") / max(1, load.requests) * 1e6
            found["rps" + suffix] = load.rps
            found["p50_ms" + suffix] = load.p50_ms
    return found


def live_trivial(body: bytes, seconds: float) -> dict[str, float]:
    """Server CPU per request of the load generator's trivial endpoint (uvloop + httptools, no framework, a
    fixed answer) at c=32 with ``body``: the floor of any Python HTTP server's cost per request; and its
    p50 at c=1 (``p50_ms_c1``), the floor of a request's latency."""
    port = serving.free_port()
    with serving.server([sys.executable, str(common.BENCH / "loadgen.py"), "--serve-trivial", str(port)],
                        f"http://127.0.0.1:{port}/", log=common.CACHE / "serving-profile" / "trivial.log") as proc:
        url = f"http://127.0.0.1:{port}/"
        loadgen.run_wrk(url, body, {}, concurrency=32, seconds=1, cpus=serving.GENERATOR_CPUS)
        before = _ticks(proc.pid)
        load = loadgen.run_wrk(url, body, {}, concurrency=32, seconds=seconds, cpus=serving.GENERATOR_CPUS)
        cpu_us = (_ticks(proc.pid) - before) / os.sysconf("SC_CLK_TCK") / max(1, load.requests) * 1e6
        one = loadgen.run_wrk(url, body, {}, concurrency=1, seconds=seconds, cpus=serving.GENERATOR_CPUS)
    return {"rps": load.rps, "server_cpu_us_per_request": cpu_us, "p50_ms_c1": one.p50_ms}


def parse_collapsed(raw: str) -> tuple[list[tuple[str, int]], int]:
    """py-spy's collapsed stacks (``frame;frame;... count`` per line), heaviest first, and how many lines were
    not of that form (py-spy has written a line cut in two, once: a profile must not die of it)."""
    stacks, unparsed = [], 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack, int(count)))
        elif line.strip():
            unparsed += 1
    stacks.sort(key=lambda item: -item[1])
    return stacks, unparsed


def classify(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first): its innermost frame that a :data:`RULES`
    fragment names; else the event loop.

    A stack whose innermost Python frame is the loop's ``run`` is in uvloop's C code: polling, socket
    reads and writes, callbacks not yet in Python.
    """
    if frames and frames[-1].startswith(("Runner.run ", "run_until_complete ", "run_forever ")):
        return "socket I/O and event loop"
    for frame in reversed(frames):  # the innermost frame of a known stage decides (numpy's frames have none)
        for stage, fragment in RULES:
            if fragment in frame:
                return stage
    return "socket I/O and event loop"


# ---------------------------------------------------------------------------------------------


def run(out: Path, *, mode: str = "full") -> dict[str, Any]:
    common.check_mode(mode)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        serving.SERVER_CPUS, serving.GENERATOR_CPUS = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, serving.SERVER_CPUS)  # the in-process stages run where the server would
    workdir = common.CACHE / f"serving-profile-{mode}"
    models = serving.prepare_models(workdir, "smoke" if mode == "smoke" else "full")
    n, rounds, seconds = {"full": (2000, 7, 5.0), "quick": (500, 3, 2.0), "smoke": (50, 1, 1.0)}[mode]
    py_spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                        if (Path(sys.executable).parent / "py-spy").exists() else None)
    rows = []
    for model in models.values():
        for encoding in ("binary", "json"):
            common.log(f"serving profile: {model.name} {encoding}: stages in-process")
            stages = in_process(workdir / "repo-batching", model, encoding, n if model.name == "cnn" else n // 4,
                                rounds)
            results = {}
            for c in (1, 32):
                common.log(f"serving profile: {model.name} {encoding}: live, c={c}")
                results[str(c)] = live(workdir / "repo-batching", model, encoding, c, seconds, out,
                                  py_spy if c == 32 and mode != "smoke" else None)
            body_bytes = (model.oip_binary() if encoding == "binary" else model.oip_json())[0]
            common.log(f"serving profile: {model.name} {encoding}: the trivial endpoint's floor")
            trivial = live_trivial(body_bytes, seconds)
            common.log(f"serving profile: {model.name} {encoding}: the Python floors, plain and with the checks")
            rows.append({"model": model.name, "encoding": encoding, "stages_us": stages, "live": results,
                         "trivial_http": trivial, "python_floor": live_floor(model, encoding, seconds),
                         "python_floor_checks": live_floor(model, encoding, seconds, checks=True)})
    body = {"benchmark": "serving_profile", "mode": mode, "machine": common.machine(), "py_spy": py_spy,
            "settings": {"calls_per_round": n, "rounds": rounds, "live_seconds": seconds,
                         "server_cpus": sorted(serving.SERVER_CPUS), "generator_cpus": sorted(serving.GENERATOR_CPUS)},
            "results": rows}
    common.write_json(out / "serving_profile.json", body)
    (out / "serving_profile.md").write_text(markdown(body))
    return body


def markdown(body: dict[str, Any]) -> str:
    text = (f"In-process stages: median of {body['settings']['rounds']} rounds, pinned to CPU "
            f"{body['settings']['server_cpus']}. Live: `bnfold serve` under wrk on CPU "
            f"{body['settings']['generator_cpus']}, server CPU from /proc. Load average "
            f"{body['machine']['load_average_1_5_15']}.\n\n")
    header = ["stage (us per request)"] + [f"{r['model']} {r['encoding']}" for r in body["results"]]
    keys = [*STAGES[:-1], "onnxruntime per row, batch of 32", "onnxruntime one row, back to back (median)",
            AFTER_PAUSE, "queueing + hand-off, worker thread", "whole request in-process"]
    rows = [[k, *[_cell(r["stages_us"].get(k)) for r in body["results"]]] for k in keys]
    for c in (1, 32):
        rows.append([f"live server CPU per request, c={c}",
                     *[f"{r['live'][str(c)]['server_cpu_us_per_request']:.1f}" for r in body["results"]]])
    rows.append(["floor: trivial HTTP endpoint, live CPU per request, c=32",
                 *[f"{r['trivial_http']['server_cpu_us_per_request']:.1f}" for r in body["results"]]])
    rows.append(["best share of the c=32 ceiling with that floor: row / (row + floor)",
                 *[f"{_floor_share(r):.2f}" for r in body["results"]]])
    rows.append(["same, with the JSON parse too: row / (row + floor + JSON decode)",
                 *[f"{_floor_share(r, parse=True):.2f}" if r["encoding"] == "json" else "-"
                   for r in body["results"]]])
    if all("p50_ms_c1" in r["trivial_http"] and AFTER_PAUSE in r["stages_us"] for r in body["results"]):
        rows.append(["trivial HTTP endpoint, p50 at c=1 (us)",
                     *[f"{1e3 * r['trivial_http']['p50_ms_c1']:.1f}" for r in body["results"]]])
        rows.append(["least c=1 p50 over in-process: that p50 + (after a pause - back to back)",
                     *[f"{_least_c1_gap_us(r):.1f}" for r in body["results"]]])
    if all("python_floor" in r for r in body["results"]):
        rows.append(["Python floor (oip_floor.py), live CPU per request, c=32",
                     *[f"{r['python_floor']['server_cpu_us_per_request']:.1f}" for r in body["results"]]])
        over = [r["live"]["32"]["server_cpu_us_per_request"] - r["python_floor"]["server_cpu_us_per_request"]
                for r in body["results"]]
        rows.append(["bnfold over the Python floor, c=32 (checks, layers)", *[f"{v:.1f}" for v in over]])
    if all("python_floor_checks" in r for r in body["results"]):
        for c, suffix in ((1, "_c1"), (32, "")):
            for label, key in (("Python floor", "python_floor"), ("Python floor + checks", "python_floor_checks")):
                if c == 32 and key == "python_floor":  # its row is above
                    continue
                rows.append([f"{label}, live CPU per request, c={c}",
                             *[f"{r[key]['server_cpu_us_per_request' + suffix]:.1f}" for r in body["results"]]])
        for c, suffix in ((1, "_c1"), (32, "")):
            rows.append([f"the checks: floor + checks over the floor, c={c}",
                         *[f"{_over(r['python_floor_checks'], r['python_floor'], suffix):.1f}"
                           for r in body["results"]]])
            rows.append([f"bnfold's structure: bnfold over floor + checks, c={c}",
                         *[f"{_over(r['live'][str(c)], r['python_floor_checks'], suffix):.1f}"
                           for r in body["results"]]])
        rows.append(["c=1 p50 (us): floor / floor + checks / bnfold",
                     *[" / ".join(f"{1e3 * p50:.0f}" for p50 in (r["python_floor"]["p50_ms_c1"],
                                                               r["python_floor_checks"]["p50_ms_c1"],
                                                               r["live"]["1"]["p50_ms"]))
                       for r in body["results"]]])
    text += common.markdown_table(header, rows)
    text += ("\nThe stages are timed one by one; *whole request in-process* is one request through the real app "
             "and protocol (fake transport). At c=32 onnxruntime runs batches, so its cost per request is below "
             "one row's run.\n")
    profiled = [r for r in body["results"] if r["live"]["32"].get("profile_shares")]
    if profiled:
        text += ("\n### Live profile at c=32 (py-spy samples by stage)\n\nFrom the collapsed stacks checked in "
                 "beside this file (`serving_profile_<model>_<body>.txt`, the heaviest 400); the flame graphs "
                 "(`.svg`) are a second recording of the same load.\n\n")
        text += common.markdown_table(
            ["stage (% of samples)"] + [f"{r['model']} {r['encoding']}" for r in profiled],
            [[s, *[f"{100 * r['live']['32']['profile_shares'].get(s, 0.0):.1f}"
                   for r in profiled]] for s in STAGES])
    return text


def _over(ours: dict[str, float], other: dict[str, float], suffix: str) -> float:
    """Server CPU per request of ``ours`` over ``other``'s; the floors' c=1 values carry ``suffix``, bnfold's
    live rows (one per concurrency) none."""
    mine = ours.get("server_cpu_us_per_request" + suffix, ours["server_cpu_us_per_request"])
    return mine - other["server_cpu_us_per_request" + suffix]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _floor_share(row: dict[str, Any], parse: bool = False) -> float:
    """The largest share of in-process onnxruntime's c=32 req/s a Python HTTP server could reach: one row's
    run at batch 32 over that plus the trivial endpoint's CPU per request (which does no work at all), and
    with ``parse`` plus the service's parse of the request's JSON (simdjson for a large body's tensor data, the
    fastest parser we measured; a Python server gets its numbers out of the JSON text somehow)."""
    run = row["stages_us"]["onnxruntime per row, batch of 32"]
    extra = row["stages_us"]["JSON decode"] if parse else 0.0
    return run / (run + row["trivial_http"]["server_cpu_us_per_request"] + extra)


def _least_c1_gap_us(row: dict[str, Any]) -> float:
    """The least a server's c=1 p50 can exceed in-process onnxruntime's (back-to-back runs) by: an HTTP round
    trip doing nothing, plus what a run after the wait between requests costs over a back-to-back one."""
    stages = row["stages_us"]
    return 1e3 * row["trivial_http"]["p50_ms_c1"] + stages[AFTER_PAUSE] - \
        stages["onnxruntime one row, back to back (median)"]


def main(argv: list[str] | None = None) -> int:
    return common.run_script(__doc__, run, markdown, argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
