"""gRPC vs HTTP binary vs HTTP JSON: requests/s of batch-1 requests at concurrency 1 and 32, one ``bnfold serve``.

One server process (pinned to the server CPU) serves HTTP and, with ``BNFOLD_GRPC_PORT``, gRPC; the
three protocols are measured against it side by side, in interleaved slices (rotating order, median
slice), with closed-loop Python clients pinned to the generator CPU:

* **gRPC**: ``grpc.aio``, one channel (one HTTP/2 connection) per concurrent client, sending the
  ``ModelInferRequest`` tritonclient.grpc sends (``raw_input_contents``), serialized once up front
  (as the HTTP generators send one fixed body), outputs answered raw;
* **HTTP binary** and **HTTP JSON**: :mod:`benchmarks.loadgen`'s asyncio generator (one keep-alive
  connection per client), the bodies of :mod:`benchmarks.serving`.

Both generators are Python asyncio clients on uvloop, so their own costs are alike; each one's ceiling
is measured against a trivial server of its protocol on the server CPU, and the server's CPU time per
request (the protocol's cost on the server, whatever the generator manages) is reported with every
point. Run by :func:`benchmarks.serving.run`, or alone: ``python benchmarks/grpc_load.py --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, loadgen

LEVELS = (1, 32)
METHOD = "/inference.GRPCInferenceService/ModelInfer"
PROTOCOLS = ("grpc", "http binary", "http json")


def infer_request(model: str, sample: np.ndarray) -> bytes:
    """The serialized ``ModelInferRequest`` tritonclient.grpc sends for one FP32 input named ``input``."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[sample.astype("<f4").tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=sample.shape)
    return request.SerializeToString()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# the gRPC generator (runs in a subprocess pinned to the generator CPUs)


async def _client(channel: Any, request: bytes, stop: float, latencies: list[float], errors: list[int]) -> None:
    call = channel.unary_unary(METHOD)  # no (de)serializers: bytes in, bytes out
    while time.perf_counter() < stop:
        start = time.perf_counter()
        try:
            await call(request, timeout=10)
        except Exception:  # grpc.aio.AioRpcError: a failed request counts, the client goes on
            errors[0] += 1
            continue
        latencies.append(time.perf_counter() - start)


async def _run_grpc(address: str, request: bytes, concurrency: int, seconds: float) -> loadgen.Load:
    import grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in channels))
        latencies: list[float] = []
        errors = [0]
        start = time.perf_counter()
        await asyncio.gather(*(_client(c, request, start + seconds, latencies, errors) for c in channels))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    if not latencies:
        raise RuntimeError(f"no answer from {address} ({errors[0]} errors)")
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return loadgen.Load("grpc.aio", concurrency, elapsed, len(latencies) + errors[0], errors[0],
                        len(latencies) / elapsed, q[49] * 1e3, q[98] * 1e3)


def run_grpc(address: str, request: bytes, *, concurrency: int, seconds: float,
             cpus: set[int] | None = None) -> loadgen.Load:
    """The gRPC generator in a subprocess pinned to ``cpus``."""
    with tempfile.NamedTemporaryFile(suffix=".pb") as fh:
        fh.write(request)
        fh.flush()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--load", address, "--request", fh.name,
               "-c", str(concurrency), "-d", str(seconds)]
        if cpus:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 90)
    if done.returncode != 0:
        raise RuntimeError(f"gRPC load generator failed: {done.stderr[-800:]}")
    return loadgen.Load(**json.loads(done.stdout.strip().splitlines()[-1]))


def serve_trivial(port: int) -> None:
    """Answer every ModelInfer with a fixed empty response (the gRPC generator's ceiling)."""
    import grpc

    async def answer(request: bytes, context: Any) -> bytes:  # a coroutine: grpc.aio runs a plain function
        return b""  # in a thread pool, one call at a time here (617 req/s at c=32, below bnfold's own gRPC)

    async def serve() -> None:
        handler = grpc.unary_unary_rpc_method_handler(answer)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    _uvloop()
    asyncio.run(serve())


def _uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


# ---------------------------------------------------------------------------------------------
# the comparison


def compare(models: dict[str, Any], http_url: str, grpc_address: str, server_pid: int, *, levels: tuple[int, ...],
            seconds: float, rounds: int, cpus: set[int] | None) -> list[dict[str, Any]]:
    """Rows ``{model, protocol, concurrency, rps, p50_ms, p99_ms, server_cpu_ms_per_request, ...}``.

    ``models`` are :class:`benchmarks.serving.Model` (name, sample, ``oip_json``, ``oip_binary``).
    """
    rows = []
    for name, model in models.items():
        url = f"{http_url}/v2/models/{name}/infer"
        grpc_body = infer_request(name, model.sample)

        def one(protocol: str, c: int, secs: float, model: Any = model, url: str = url,
                grpc_body: bytes = grpc_body) -> loadgen.Load:
            if protocol == "grpc":
                return run_grpc(grpc_address, grpc_body, concurrency=c, seconds=secs, cpus=cpus)
            body, headers = model.oip_binary() if protocol == "http binary" else model.oip_json()
            return loadgen.run_asyncio(url, body, headers, concurrency=c, seconds=secs, cpus=cpus)

        for protocol in PROTOCOLS:
            one(protocol, 8, 0.3)  # warm-up, not recorded
        for c in levels:
            slices: dict[str, list[loadgen.Load]] = {p: [] for p in PROTOCOLS}
            cpu = dict.fromkeys(PROTOCOLS, 0.0)
            for round_ in range(rounds):
                order = PROTOCOLS[round_ % 3:] + PROTOCOLS[:round_ % 3]
                for protocol in order:
                    before = common.tree_cpu_seconds(server_pid)
                    slices[protocol].append(one(protocol, c, seconds / rounds))
                    cpu[protocol] += common.tree_cpu_seconds(server_pid) - before
            for protocol in PROTOCOLS:
                got = slices[protocol]
                requests = sum(s.requests for s in got)
                rows.append({"model": name, "protocol": protocol, "concurrency": c, "generator": got[0].generator,
                             "requests": requests, "errors": sum(s.errors for s in got),
                             "rps": statistics.median(s.rps for s in got),
                             "p50_ms": statistics.median(s.p50_ms for s in got),
                             "p99_ms": statistics.median(s.p99_ms for s in got),
                             "server_cpu_ms_per_request": cpu[protocol] / max(1, requests) * 1e3})
                common.log(f"  {name} {protocol} c={c}: {rows[-1]['rps']:.0f} req/s, p50 {rows[-1]['p50_ms']:.2f} ms, "
                           f"server CPU {rows[-1]['server_cpu_ms_per_request']:.3f} ms/request, "
                           f"errors {rows[-1]['errors']}")
    return rows


def ceilings(levels: tuple[int, ...], seconds: float, body: tuple[bytes, dict[str, str]], grpc_body: bytes,
             server_cpus: set[int], cpus: set[int] | None, logs: Path) -> list[dict[str, Any]]:
    """Each generator against a trivial server of its protocol on the server CPUs, with that server's CPU time
    per request: the least any server on that protocol's library can spend."""
    from benchmarks.serving import free_port, server

    def measured(protocol: str, pid: int, load: Any) -> dict[str, Any]:
        before = common.tree_cpu_seconds(pid)
        got = load()
        cpu = common.tree_cpu_seconds(pid) - before
        return {"protocol": protocol, **got.to_dict(), "server_cpu_ms_per_request": cpu / max(1, got.requests) * 1e3}

    if server_cpus:  # e.g. the serving benchmark's servers still exiting: the ceiling would be theirs
        busy = common.wait_quiet(server_cpus)
        common.log(f"gRPC comparison: server CPUs {busy:.0%} busy before the ceilings")
    rows = []
    http_port, grpc_port = free_port(), free_port()
    taskset = ["taskset", "-c", ",".join(map(str, sorted(server_cpus)))] if server_cpus else []
    url = f"http://127.0.0.1:{http_port}/"
    with server([sys.executable, str(common.BENCH / "loadgen.py"), "--serve-trivial", str(http_port)], url,
                log=logs / "trivial-http.log") as proc:
        for c in levels:
            rows.append(measured("http", proc.pid, lambda c=c: loadgen.run_asyncio(url, *body, concurrency=c,
                                                                                  seconds=seconds, cpus=cpus)))
    with (logs / "trivial-grpc.log").open("wb") as log:
        proc = subprocess.Popen([*taskset, sys.executable, str(Path(__file__).resolve()), "--serve-trivial",
                                 str(grpc_port)], stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # "ready"
            address = f"127.0.0.1:{grpc_port}"
            run_grpc(address, grpc_body, concurrency=8, seconds=0.3, cpus=cpus)  # warm-up, not recorded
            for c in levels:
                rows.append(measured("grpc", proc.pid, lambda c=c: run_grpc(address, grpc_body, concurrency=c,
                                                                           seconds=seconds, cpus=cpus)))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return rows


def markdown(body: dict[str, Any]) -> str:
    """The protocol table (req/s, latency, server CPU per request) and the generators' ceilings."""
    rows = body["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    when = body.get("machine", {}).get("date_utc")
    text = (f"One `bnfold serve` (dynamic batching, defaults) on CPU {body['server_cpus']}, Python asyncio "
            f"clients on CPU {body['generator_cpus']}, {body['seconds_per_point']:g} s per point in "
            f"{body['rounds']} interleaved slices, batch-1 requests, "
            f"{f'run {when}, ' if when else ''}load average {body['load_average']}.\n\n")
    header = ["model", "protocol", *[f"req/s c={c}" for c in levels], *[f"p50/p99 ms c={c}" for c in levels],
              *[f"server CPU ms/req c={c}" for c in levels]]
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for protocol in PROTOCOLS:
            by_c = {r["concurrency"]: r for r in rows if r["model"] == model and r["protocol"] == protocol}
            table.append([model, protocol, *[f"{by_c[c]['rps']:.0f}" for c in levels],
                          *[f"{by_c[c]['p50_ms']:.2f} / {by_c[c]['p99_ms']:.2f}" for c in levels],
                          *[f"{by_c[c]['server_cpu_ms_per_request']:.3f}" for c in levels]])
    text += common.markdown_table(header, table)
    text += "\n### Generator ceilings (trivial server of each protocol on the server CPU)\n\n"
    text += common.markdown_table(
        ["protocol", "concurrency", "req/s", "p50 ms", "server CPU ms/req"],
        [[g["protocol"], g["concurrency"], f"{g['rps']:.0f}", f"{g['p50_ms']:.2f}",
          f"{g['server_cpu_ms_per_request']:.3f}" if "server_cpu_ms_per_request" in g else "not measured"]
         for g in body["ceilings"]])
    return text


def plot(body: dict[str, Any], path: Path) -> None:
    """Grouped bars: req/s per protocol at each concurrency, one panel per model; server CPU ms/req on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = body["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.0), squeeze=False)
    width = 0.8 / len(PROTOCOLS)
    for ax, model in zip(axes[0], models, strict=True):
        for k, protocol in enumerate(PROTOCOLS):
            got = [next(r for r in rows if r["model"] == model and r["protocol"] == protocol
                        and r["concurrency"] == c) for c in levels]
            xs = [i + (k - 1) * width for i in range(len(levels))]
            bars = ax.bar(xs, [r["rps"] for r in got], width, label=protocol)
            for bar, r in zip(bars, got, strict=True):
                ax.annotate(f"{r['server_cpu_ms_per_request']:.2f}", (bar.get_x() + bar.get_width() / 2,
                                                                     bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
        ax.set_ylabel("requests/s (median slice)")
        ax.set_title(f"{model}: batch-1 requests", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("bnfold serve: gRPC vs HTTP binary vs HTTP JSON (labels: server CPU ms per request)\n"
                 f"load average {body['load_average']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, models: dict[str, Any], *, mode: str, server_cpus: set[int], generator_cpus: set[int],
        workdir: Path) -> dict[str, Any]:
    """Serve ``models`` (``workdir/repo-batching``) over HTTP and gRPC, compare, write ``serving_grpc.*`` to ``out``."""
    from benchmarks import serving

    seconds = {"full": 3.0, "quick": 1.5, "smoke": 0.5}[mode]
    rounds = {"full": 3, "quick": 3, "smoke": 1}[mode]
    http_port, grpc_port = serving.free_port(), serving.free_port()
    env = {"BNFOLD_MODEL_REPOSITORY": str(workdir / "repo-batching"), "BNFOLD_PORT": str(http_port),
           "BNFOLD_GRPC_PORT": str(grpc_port), "BNFOLD_HOST": "127.0.0.1", "BNFOLD_LOG_LEVEL": "warning"}
    first = next(iter(models.values()))
    limits = ceilings(LEVELS, seconds / rounds, first.oip_json(), infer_request(first.name, first.sample),
                      server_cpus, generator_cpus, workdir / "logs")
    with serving.server([sys.executable, "-m", "service"], f"http://127.0.0.1:{http_port}/v2/health/ready", env=env,
                        log=workdir / "logs" / "server-grpc.log") as proc:
        for name, model in models.items():  # one request each way, checked against in-process onnxruntime
            _check(name, model, f"127.0.0.1:{grpc_port}")
        rows = compare(models, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc.pid, levels=LEVELS,
                       seconds=seconds, rounds=rounds, cpus=generator_cpus)
    body = {"benchmark": "serving_grpc", "mode": mode, "machine": common.machine(),
            "load_average": common.machine()["load_average_1_5_15"], "server_cpus": sorted(server_cpus),
            "generator_cpus": sorted(generator_cpus), "seconds_per_point": seconds, "rounds": rounds,
            "ceilings": limits, "rows": rows}
    common.write_json(out / "serving_grpc.json", body)
    (out / "serving_grpc.md").write_text(markdown(body))
    plot(body, out / "serving_grpc.png")
    return body


def _check(name: str, model: Any, address: str) -> None:
    import tritonclient.grpc as triton

    from benchmarks.serving import _reference

    client = triton.InferenceServerClient(address)
    inp = triton.InferInput("input", list(model.sample.shape), "FP32")
    inp.set_data_from_numpy(model.sample.astype(np.float32))
    got = client.infer(name, [inp]).as_numpy(client.get_model_metadata(name).outputs[0].name)
    client.close()
    want = _reference(model)
    if float(np.max(np.abs(got - want))) > 1e-4 * max(1.0, float(np.max(np.abs(want)))):
        raise RuntimeError(f"gRPC answered {got} for {name}, expected {want}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_mode_options(parser)
    parser.add_argument("--load", metavar="ADDRESS", help=argparse.SUPPRESS)  # internal: the generator
    parser.add_argument("--request", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("-c", "--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("-d", "--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-trivial", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_trivial is not None:
        serve_trivial(args.serve_trivial)
        return 0
    if args.load is not None:
        _uvloop()
        load = asyncio.run(_run_grpc(args.load, args.request.read_bytes(), args.concurrency, args.seconds))
        print(json.dumps(load.to_dict()))
        return 0
    import os

    from benchmarks import serving

    common.check_mode(args.mode)
    cpus = os.sched_getaffinity(0)
    server_cpus, generator_cpus = ({min(cpus)}, {sorted(cpus)[1]}) if len(cpus) >= 2 else (set(), set())
    serving.SERVER_CPUS = server_cpus
    workdir = common.CACHE / f"serving-grpc-{args.mode}"
    models = serving.prepare_models(workdir, args.mode)
    print(markdown(run(common.out_dir(args.out, args.mode), models, mode=args.mode, server_cpus=server_cpus,
                       generator_cpus=generator_cpus, workdir=workdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
