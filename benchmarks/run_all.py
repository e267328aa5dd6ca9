"""Run every benchmark (folding speedup, fold cost, serving), draw the plots and write summary.md.

    python benchmarks/run_all.py            # the published numbers -> benchmarks/results/ (< 10 min on 2 cores)
    python benchmarks/run_all.py --quick    # a few minutes -> benchmarks/results-quick/
    python benchmarks/run_all.py --smoke    # seconds; what CI runs (tests/test_benchmarks_smoke.py)

Options: ``--only folding|fold_cost|serving|route_overhead`` (repeatable), ``--skip-server LABEL`` (e.g. bentoml),
``--generator wrk|asyncio``, ``--baseline DIR`` (``--baseline-label``): serve bnfold from another tree beside this one.
``benchmarks/real_archs.py`` (torchvision and timm architectures) is not run from here:
it needs the ``real`` extra in an environment of its own (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, fold_cost, folding, plots, report, route_overhead, serving

BENCHMARKS = ("folding", "fold_cost", "serving", "route_overhead")  # route_overhead reuses serving's models


def summary(results: dict[str, dict[str, Any]], seconds: float,
            earlier: dict[str, dict[str, Any]] | None = None) -> str:
    """The issue's targets with the measured values, one line each, from this run, and from ``earlier``
    (the last runs of the benchmarks not run now, as checked in), which the first line names."""
    ran = list(results)
    machine = list(results.values())[-1]["machine"] if results else common.machine()  # the end of the run
    older = "".join(f" {name} is from its run of {body['machine']['date_utc']}."
                    for name, body in (earlier or {}).items())
    results = {**(earlier or {}), **results}
    rows = []
    fold = results.get("folding")
    if fold:
        for r in fold["results"]:
            by = {(lat["runtime"], lat["batch"]): lat["ratio"] for lat in r["latency"]}
            if r["model"] in ("resnet", "mobilenet", "resnet 3x32x32"):
                v = by[("pytorch eager", 1)]
                rows.append([f"{r['model']}: eager batch 1 speedup >= 1.10x", f"{v:.2f}x", _met(v >= 1.10)])
            worst = min((v, k) for k, v in by.items() if k[0].startswith("onnxruntime"))
            rows.append([f"{r['model']}: never slower in onnxruntime (worst ratio)",
                         f"{worst[0]:.2f}x ({worst[1][0]}, batch {worst[1][1]})", _met(worst[0] >= 1.0)])
            sess = min(s["ratio"] for s in r["session_creation"])
            rows.append([f"{r['model']}: faster session creation (worst of opt off/on)", f"{sess:.2f}x",
                         _met(sess > 1.0)])
    cost = results.get("fold_cost")
    if cost:
        f = cost["fits"]["total"]
        rows.append(["fold cost linear in depth (R^2, log-log slope)",
                     f"R^2 {f['r2']:.4f}, log-log slope {f['loglog_slope']:.2f}, "
                     f"{f['slope_s_per_layer'] * 1e3:.1f} ms per layer",
                     _met(f["r2"] >= 0.98)])
    serve = results.get("serving")
    if serve:
        for t in serve["targets"]:
            unit = " ms" if t["target"].startswith("c=1 p50") else "x"
            rows.append([f"{t['model']} {t['encoding']}: {t['target']}", f"{t['value']:.2f}{unit} "
                         f"({_num(t['ours'])} vs {_num(t['theirs'])})", _met(t["met"])])
        top = max(g["rps"] for g in serve["generator_ceiling"])
        # The Python floors are bounds, not servers under test: they do the least work a server can, so they
        # run close to the trivial endpoint the generator's ceiling is measured on (both limited by one core).
        best = max(r["rps"] for r in serve["results"]
                   if r["generator"] != "none" and r["server"] not in (serving.FLOOR, serving.FLOOR_CHECKS))
        rows.append(["load generator is not the bottleneck (its ceiling vs the fastest server)",
                     f"{top:.0f} vs {best:.0f} req/s", _met(top >= 2 * best)])
    return (f"Run of {machine['date_utc']} ({', '.join(ran)}) on {machine['cpu']} ({machine['cores']} cores), "
            f"load average {machine['load_average_1_5_15']} at the end, total {seconds:.0f} s.{older}\n\n"
            + common.markdown_table(["target", "measured", "met"], rows))


def _num(value: float) -> str:
    """Requests/s as integers, milliseconds with two decimals."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_mode_options(parser)
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--skip-server", action="append", default=[], metavar="LABEL",
                        help="serving: skip servers whose label contains LABEL (e.g. bentoml)")
    parser.add_argument("--generator", choices=["auto", "wrk", "asyncio"], default="auto")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="serving: also serve bnfold from this source tree (see serving.py --baseline)")
    parser.add_argument("--baseline-label", default="bnfold serve (batching), baseline tree")
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "service" / "__main__.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a bnfold source tree (no service/__main__.py)")
    out = common.out_dir(args.out, args.mode)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    common.log(f"run_all ({args.mode}) -> {out}; load average {os.getloadavg()}")
    for name in args.only or BENCHMARKS:
        if name == "folding":
            results[name] = folding.run(out, mode=args.mode)
        elif name == "fold_cost":
            results[name] = fold_cost.run(out, mode=args.mode)
        elif name == "serving":
            results[name] = serving.run(out, mode=args.mode, skip=tuple(s.lower() for s in args.skip_server),
                                        generator=args.generator,
                                        baseline=None if args.baseline is None else (args.baseline.resolve(),
                                                                                     args.baseline_label))
        else:
            results[name] = route_overhead.run(out, mode=args.mode)
    plots.draw(out)
    earlier = {name: json.loads((out / f"{name}.json").read_text()) for name in BENCHMARKS
               if name not in results and (out / f"{name}.json").is_file()}  # --only: the others' last run
    text = summary(results, time.perf_counter() - start, earlier)
    (out / "summary.md").write_text(text)
    print(text)
    if out == common.RESULTS and args.mode == "full":
        report.update_readmes(out)  # the READMEs quote the checked-in runs
        common.log("updated the result tables in benchmarks/README.md and README.md")
    common.log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
