"""A/B of ``bnfold serve`` source trees, interleaved: which change to the service is faster, and by how much.

The full serving benchmark measures every server a few seconds each; a change worth a few percent of
server CPU is inside its noise on a shared machine. This script serves one model from two or more
source trees at once (a ``git worktree`` or ``git archive`` of each commit), and measures them in
alternation: ``--samples`` short wrk slices each, the order rotated every round, the servers
restarted ``--restarts`` times (one process can be 8% off another of the same code), server pinned to one
CPU and wrk to another (as in ``serving.py``). It reports, per tree, the median req/s and the median
server CPU per request (from ``/proc``, which moves less than req/s under noise), the median of the
slices' p50 latencies (what the c=1 goal is about), and each tree's ratio to the first.

    python benchmarks/serving_ab.py /tmp/bnfold-old . --model cnn --encoding binary -c 32 --samples 12

``floor`` in place of a tree measures ``oip_floor.py`` beside them, ``floor-checks`` ``oip_floor.py --checks``.
Results go to stdout as a table and, with ``--json``, to a file; nothing is checked in by default (a
checked-in claim belongs to ``serving.py``'s run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, loadgen, serving

FLOORS = {"floor": [], "floor-checks": ["--checks"]}  # oip_floor.py, plain and with the service's checks


def _command(tree: str, port: int, workdir: Path, models: dict[str, serving.Model]) -> tuple[list[str], dict[str, str],
                                                                                            Path, str]:
    if tree in FLOORS:
        return ([sys.executable, str(common.BENCH / "oip_floor.py"), *FLOORS[tree], str(port),
                 *[f"{m.name}={m.onnx}" for m in models.values()]], {}, common.ROOT, f"http://127.0.0.1:{port}/")
    root = Path(tree).resolve()
    env = {"BNFOLD_MODEL_REPOSITORY": str(workdir / "repo-batching"), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_LOG_LEVEL": "warning", "PYTHONPATH": str(root)}
    return [sys.executable, "-m", "service"], env, root, f"http://127.0.0.1:{port}/v2/health/ready"


def run(trees: list[str], *, model: str, encoding: str, concurrency: int, seconds: float,
        samples: int, restarts: int) -> dict[str, Any]:
    """Serve ``model`` from every tree at once and measure them in rotated alternation; medians per tree.

    The servers are started ``restarts`` times, the samples spread over them: two processes of the same
    code differ by up to 8% here (measured: three copies of one tree), more than the changes measured.
    """
    for tree in trees:  # before any work
        if tree not in FLOORS and not (Path(tree) / "service" / "__main__.py").is_file():
            raise SystemExit(f"error: {tree} is not a bnfold source tree (no service/__main__.py); "
                             "pass a checkout, a `git archive` of one, `floor` or `floor-checks`")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        serving.SERVER_CPUS, serving.GENERATOR_CPUS = {cpus[0]}, {cpus[1]}
    wrk = loadgen.ensure_wrk(install=False)
    generator = "wrk" if wrk else "asyncio"
    mode = "smoke" if model == "cnn" else "quick"  # smoke: the cnn only, as in serving.py --smoke
    workdir = common.CACHE / f"serving-{mode}"
    models = serving.prepare_models(workdir, mode)
    chosen = models[model]
    body, headers = chosen.oip_binary() if encoding == "binary" else chosen.oip_json()
    rps: dict[str, list[float]] = {t: [] for t in trees}
    cpu_us: dict[str, list[float]] = {t: [] for t in trees}
    p50_ms: dict[str, list[float]] = {t: [] for t in trees}
    done = 0
    for start in range(restarts):  # fresh processes: one process of the same code can be 8% off another
        with contextlib.ExitStack() as stack:
            urls, pids = {}, {}
            for i, tree in enumerate(trees):
                port = serving.free_port()
                cmd, env, cwd, ready = _command(tree, port, workdir, models)
                proc = stack.enter_context(serving.server(cmd, ready, env=env, cwd=cwd,
                                                          log=workdir / "logs" / f"ab-{i}.log"))
                urls[tree], pids[tree] = f"http://127.0.0.1:{port}/v2/models/{model}/infer", proc.pid
            for tree in trees:  # warm-up, not recorded
                loadgen.run_load(generator, urls[tree], body, headers, concurrency=8, seconds=1,
                                 cpus=serving.GENERATOR_CPUS)
            for _ in range(samples // restarts + (start < samples % restarts)):
                shift = done % len(trees)
                done += 1
                for tree in trees[shift:] + trees[:shift]:
                    before = common.tree_cpu_seconds(pids[tree])
                    load = loadgen.run_load(generator, urls[tree], body, headers, concurrency=concurrency,
                                            seconds=seconds, cpus=serving.GENERATOR_CPUS)
                    used = common.tree_cpu_seconds(pids[tree]) - before
                    if load.errors:
                        raise RuntimeError(f"{tree}: {load.errors} errors in a slice")
                    rps[tree].append(load.rps)
                    cpu_us[tree].append(used / max(1, load.requests) * 1e6)
                    p50_ms[tree].append(load.p50_ms)
                common.log(f"sample {done}/{samples}, req/s / CPU us per request in tree order: " + "  ".join(
                    f"{rps[t][-1]:.0f}/{cpu_us[t][-1]:.0f}" for t in trees))
    first = trees[0]
    rows = []
    for tree in trees:
        r, c = statistics.median(rps[tree]), statistics.median(cpu_us[tree])
        rows.append({"tree": tree, "rps": r, "cpu_us_per_request": c, "p50_ms": statistics.median(p50_ms[tree]),
                     "rps_ratio": r / statistics.median(rps[first]),
                     "cpu_ratio": c / statistics.median(cpu_us[first]),
                     "rps_samples": rps[tree], "cpu_us_samples": cpu_us[tree], "p50_ms_samples": p50_ms[tree]})
    return {"model": model, "encoding": encoding, "concurrency": concurrency, "seconds_per_sample": seconds,
            "samples": samples, "restarts": restarts, "generator": generator, "load_average": os.getloadavg(),
            "at": time.time(), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    head = (f"{result['model']} {result['encoding']} c={result['concurrency']}: {result['samples']} samples of "
            f"{result['seconds_per_sample']:g} s each over {result['restarts']} starts, {result['generator']}; load "
            f"{', '.join(f'{x:.2f}' for x in result['load_average'])}\n\n")
    return head + common.markdown_table(
        ["tree", "req/s", "CPU us/request", "p50 ms", "req/s vs first", "CPU vs first"],
        [[r["tree"], f"{r['rps']:.0f}", f"{r['cpu_us_per_request']:.1f}", f"{r['p50_ms']:.3f}", f"{r['rps_ratio']:.3f}",
          f"{r['cpu_ratio']:.3f}"] for r in result["rows"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+",
                        help="bnfold source trees (or `floor`, `floor-checks`); the first is the reference")
    parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    parser.add_argument("--encoding", choices=("binary", "json"), default="binary")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one sample (default 2)")
    parser.add_argument("--samples", type=int, default=12, help="samples per tree (default 12)")
    parser.add_argument("--restarts", type=int, default=4,
                        help="start fresh servers this many times, the samples spread over them (default 4)")
    parser.add_argument("--json", type=Path, help="also write the result, with every sample, to this file")
    args = parser.parse_args(argv)
    if len(set(args.trees)) != len(args.trees):
        parser.error("each tree once")
    result = run(args.trees, model=args.model, encoding=args.encoding, concurrency=args.concurrency,
                 seconds=args.seconds, samples=args.samples,
                 restarts=max(1, min(args.restarts, args.samples)))
    print(markdown(result))
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
