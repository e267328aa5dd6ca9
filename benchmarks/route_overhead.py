"""Where bnfold serve's time goes: the same inference handler behind FastAPI's route vs a raw Starlette route.

The serving benchmark shows ``bnfold serve`` spending far more CPU per request than onnxruntime
does (cnn: ~0.3 ms per request for ~0.01 ms of model time), and py-spy puts most of the main
thread's time in FastAPI's own request handling (dependency solving, included-router matching,
the request/response wrapper), not in bnfold's code. This experiment measures that share directly:
one server process runs bnfold's unchanged app plus two extra routes that call the very same
:func:`service.inference.infer` (without the API-key check, body cap and metrics, which are cheap):
``POST /raw/v2/models/{name}/infer``, a plain Starlette endpoint, and
``POST /nodeps/v2/models/{name}/infer``, the same handler as a FastAPI route on the app itself
without dependencies; all paths are loaded in interleaved slices and compared on server CPU per
request and requests/s.
Nothing in ``service/`` is changed.

Run: ``python benchmarks/route_overhead.py [--quick] [--out DIR]`` (needs the serving benchmark's
model repository: run ``serving.py`` first, same mode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from starlette.requests import Request  # module level: FastAPI resolves the route's annotations here
from starlette.responses import Response

from benchmarks import common, loadgen, serving


def app() -> Any:
    """bnfold's app from ``BNFOLD_*`` settings, plus the raw Starlette route in front of its routers."""
    from starlette.routing import Route

    from service import inference
    from service.errors import ServiceError
    from service.main import create_app

    fastapi_app = create_app()

    async def raw_infer(request: Request) -> Response:
        repository = request.app.state.service.repository
        body = await request.body()
        try:
            result = await inference.infer(repository, request.path_params["name"], None, body,
                                           request.headers.get("inference-header-content-length"))
        except ServiceError as exc:
            return Response(str(exc), status_code=400)
        if result.header_length is None:
            return Response(result.body, media_type="application/json")
        return Response(result.body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(result.header_length)})

    async def nodeps_infer(name: str, request: Request) -> Response:
        """The raw handler as a FastAPI route on the app itself: no dependencies, no included router."""
        return await raw_infer(request)

    fastapi_app.router.routes.insert(0, Route("/raw/v2/models/{name}/infer", raw_infer, methods=["POST"]))
    fastapi_app.add_api_route("/nodeps/v2/models/{name}/infer", nodeps_infer, methods=["POST"])
    fastapi_app.router.routes.insert(1, fastapi_app.router.routes.pop())  # match before the included routers
    return fastapi_app


def serve() -> None:
    import uvicorn

    uvicorn.run(app(), host="127.0.0.1", port=int(os.environ["BNFOLD_PORT"]), log_level="warning", access_log=False)


def run(out: Path, *, mode: str = "full") -> dict[str, Any]:
    common.check_mode(mode)
    repo = common.CACHE / f"serving-{mode}" / "repo-batching"
    if not repo.is_dir():
        flag = "" if mode == "full" else f" --{mode}"
        raise SystemExit(f"{repo} is missing: run `python benchmarks/serving.py{flag}` first")
    rounds, seconds, concurrency = (3, 1.0, 32) if mode == "full" else (1, 0.5, 32)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        serving.SERVER_CPUS, serving.GENERATOR_CPUS = {cpus[0]}, {cpus[1]}
    generator = "wrk" if loadgen.ensure_wrk(install=False) else "asyncio"
    common.log(f"route overhead: {generator} on CPU {sorted(serving.GENERATOR_CPUS)}")
    port = serving.free_port()
    env = {"BNFOLD_MODEL_REPOSITORY": str(repo), "BNFOLD_PORT": str(port), "BNFOLD_LOG_LEVEL": "warning"}
    shapes = {"cnn": [1, 8, 8], "resnet": [3, 32, 32]}
    rows = []
    with serving.server([sys.executable, str(Path(__file__).resolve()), "--serve"],
                        f"http://127.0.0.1:{port}/v2/health/ready", env=env,
                        log=repo.parent / "logs" / "route-overhead.log") as proc:
        for name in sorted(p.name for p in repo.iterdir() if p.name in shapes):
            sample = np.random.default_rng(7).standard_normal((1, *shapes[name])).astype(np.float32)
            model = serving.Model(name, Path(), Path(), shapes[name], sample)
            for encoding in ("json", "binary"):
                body, headers = model.oip_binary() if encoding == "binary" else model.oip_json()
                urls = {"FastAPI route (as served)": f"http://127.0.0.1:{port}/v2/models/{name}/infer",
                        "FastAPI route, no dependencies": f"http://127.0.0.1:{port}/nodeps/v2/models/{name}/infer",
                        "raw Starlette route": f"http://127.0.0.1:{port}/raw/v2/models/{name}/infer"}
                answers = [serving.decode_output(*serving.post(u, body, headers)) for u in urls.values()]
                assert all((a == answers[0]).all() for a in answers), "every route must answer identically"
                cpu: dict[str, list[float]] = {k: [] for k in urls}
                rps: dict[str, list[float]] = {k: [] for k in urls}
                for url in urls.values() if mode != "smoke" else ():  # warm-up, not recorded
                    loadgen.run_load(generator, url, body, headers, concurrency=concurrency, seconds=1.0,
                                     cpus=serving.GENERATOR_CPUS)
                for round_ in range(rounds):
                    shift = round_ % len(urls)
                    for label in list(urls)[shift:] + list(urls)[:shift]:
                        before = common.tree_cpu_seconds(proc.pid)
                        load = loadgen.run_load(generator, urls[label], body, headers, concurrency=concurrency,
                                                seconds=seconds, cpus=serving.GENERATOR_CPUS)
                        cpu[label].append((common.tree_cpu_seconds(proc.pid) - before) / load.requests * 1e3)
                        rps[label].append(load.rps)
                for label in urls:
                    rows.append({"model": name, "encoding": encoding, "route": label, "concurrency": concurrency,
                                 "server_cpu_ms_per_request": statistics.median(cpu[label]),
                                 "rps": statistics.median(rps[label])})
                    common.log(f"  {name} {encoding} {label}: {rows[-1]['rps']:.0f} req/s, "
                               f"{rows[-1]['server_cpu_ms_per_request']:.3f} ms CPU/request")
    body_ = {"benchmark": "route_overhead", "mode": mode, "machine": common.machine(),
             "settings": {"generator": generator, "server_cpus": sorted(serving.SERVER_CPUS),
                          "generator_cpus": sorted(serving.GENERATOR_CPUS), "rounds": rounds,
                          "seconds_per_slice": seconds},
             "results": rows}
    common.write_json(out / "route_overhead.json", body_)
    (out / "route_overhead.md").write_text(markdown(body_))
    return body_


def markdown(body: dict[str, Any]) -> str:
    routes = list(dict.fromkeys(r["route"] for r in body["results"]))
    by = {(r["model"], r["encoding"], r["route"]): r for r in body["results"]}
    rows = []
    for model, encoding in dict.fromkeys((r["model"], r["encoding"]) for r in body["results"]):
        base = by[(model, encoding, routes[0])]
        rows.append([model, encoding, *[f"{by[(model, encoding, route)]['server_cpu_ms_per_request']:.3f}"
                                        for route in routes],
                     *[f"{r['rps']:.0f} ({r['rps'] / base['rps']:.2f}x)"
                       for r in (by[(model, encoding, route)] for route in routes)]])
    header = ["model", "body", *[f"CPU ms/req, {route}" for route in routes], *[f"req/s, {route}" for route in routes]]
    return (f"c={body['results'][0]['concurrency']}, load average {body['machine']['load_average_1_5_15']}\n\n"
            + common.markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_mode_options(parser)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the server process
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    print(markdown(run(common.out_dir(args.out, args.mode), mode=args.mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
