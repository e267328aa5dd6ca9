"""Render the result tables of benchmarks/README.md and the main README's Benchmarks section from the JSON files.

The tables sit between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers, so the
numbers quoted in the READMEs are always those of the checked-in run. ``run_all.py`` calls
:func:`update_readmes` after a full run into ``benchmarks/results``; by hand:
``python benchmarks/report.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

BN, NAIVE, BENTO, CEIL = ("bnfold serve (batching)", "naive FastAPI + PyTorch", "BentoML (adaptive batching)",
                          "in-process onnxruntime")
CELLS = (("cnn", "json"), ("cnn", "binary"), ("resnet", "json"), ("resnet", "binary"))
SHOWN = {"cnn": "cnn (1x8x8)", "resnet": "resnet 3x32x32"}


def _cell_header(model: str, encoding: str) -> str:
    return f"{SHOWN.get(model, model)} {'JSON' if encoding == 'json' else encoding}"


def _ratio(r: dict[str, Any], runtime: str, batch: int) -> float:
    return float(next(lat["ratio"] for lat in r["latency"] if lat["runtime"] == runtime and lat["batch"] == batch))


def _session(r: dict[str, Any], optimize: bool) -> float:
    return float(next(s["ratio"] for s in r["session_creation"] if s["optimize"] == optimize))


def folding_table(body: dict[str, Any]) -> str:
    rows = []
    for r in body["results"]:
        f = r["file"]
        rows.append([r["model"], *[f"{_ratio(r, rt, b):.2f}x" for rt in ("pytorch eager", "onnxruntime (opt off)",
                                                                          "onnxruntime (opt on)") for b in (1, 32)],
                     f"{_session(r, False):.2f}x / {_session(r, True):.2f}x",
                     f"{f['unfolded_nodes']} -> {f['folded_nodes']}"])
    return common.markdown_table(["model", "eager b=1", "eager b=32", "ORT opt off b=1", "ORT opt off b=32",
                                  "ORT opt on b=1", "ORT opt on b=32", "session create (opt off / on)",
                                  "ONNX nodes"], rows)


def _row(body: dict[str, Any], server: str, model: str, encoding: str, c: int) -> dict[str, Any] | None:
    return next((r for r in body["results"] if r["server"] == server and r["model"] == model
                 and r["encoding"] == encoding and r["concurrency"] == c), None)


def serving_table(body: dict[str, Any], c: int = 32) -> str:
    servers = list(dict.fromkeys(r["server"] for r in body["results"]))
    rows = []
    for server in servers:
        cells = []
        for model, encoding in CELLS:
            r = _row(body, server, model, "none" if server == CEIL else encoding, c)
            cells.append("-" if r is None or (server == CEIL and encoding == "binary")
                         else (f"**{r['rps']:.0f}**" if server == BN else f"{r['rps']:.0f}"))
        rows.append([server, *cells])
    cpu = []
    for model, encoding in CELLS:
        parts = [_row(body, s, model, encoding, c) for s in (BN, NAIVE, BENTO)]
        cpu.append(" / ".join("-" if p is None else f"{p['server_cpu_ms_per_request']:.2f}" for p in parts))
    rows.append(["server CPU ms/request: bnfold / naive / BentoML", *cpu])
    header = [f"requests/s at c={c}", *[_cell_header(m, e) for m, e in CELLS]]
    return common.markdown_table(header, rows)


def latency_table(body: dict[str, Any]) -> str:
    rows = []
    for server in (BN, CEIL):
        cells = []
        for model, encoding in CELLS:
            r = _row(body, server, model, "none" if server == CEIL else encoding, 1)
            cells.append("-" if r is None or (server == CEIL and encoding == "binary") else f"{r['p50_ms']:.2f} ms")
        rows.append([server, *cells])
    return common.markdown_table(["p50 latency at c=1", *[_cell_header(m, e) for m, e in CELLS]], rows)


def load_averages(results: dict[str, dict[str, Any]]) -> str:
    """``run of DATE UTC, 1-min load average A-B``; ``runs of DATE UTC (names), ...`` when the results come
    from runs hours apart (``run_all.py --only`` reran some)."""
    loads = [b["machine"]["load_average_1_5_15"][0] for b in results.values()]
    load = f"1-min load average {min(loads):.1f}-{max(loads):.1f}"
    stamps = {name: datetime.fromisoformat(b["machine"]["date_utc"].rstrip("Z")) for name, b in results.items()}
    first = min(stamps.values())
    if max(stamps.values()) - first <= timedelta(hours=1):
        return f"run of {first:%Y-%m-%d %H:%M} UTC, {load}"
    runs: dict[str, list[str]] = {}
    for name, stamp in sorted(stamps.items(), key=lambda item: item[1]):
        runs.setdefault(f"{stamp:%Y-%m-%d %H:%M}", []).append(name)
    return "runs of " + ", ".join(f"{date} UTC ({', '.join(names)})" for date, names in runs.items()) + f", {load}"


def main_readme(results: dict[str, dict[str, Any]]) -> str:
    """The main README's tables: folding ratios and serving requests/s."""
    fold, serve, cost = results["folding"], results["serving"], results["fold_cost"]
    models = [r["model"] for r in fold["results"]]
    by = {r["model"]: r for r in fold["results"]}
    rows = [["PyTorch eager, batch 1", *[f"{_ratio(by[m], 'pytorch eager', 1):.2f}x" for m in models]],
            ["onnxruntime, all optimizations, batch 1 / 32",
             *[f"{_ratio(by[m], 'onnxruntime (opt on)', 1):.2f}x / {_ratio(by[m], 'onnxruntime (opt on)', 32):.2f}x"
               for m in models]],
            ["onnxruntime session creation (optimizations on)", *[f"{_session(by[m], True):.2f}x" for m in models]]]
    when = load_averages(results)
    when = "One " + when if when.startswith("run ") else when[0].upper() + when[1:]
    text = (f"{when} on a shared {fold['machine']['cores']}-core {fold['machine']['cpu']}; "
            "ratios are unfolded / folded, medians of interleaved runs:\n\n")
    text += common.markdown_table(["", *models], rows)
    text += ("\nServing batch-1 requests at 32 concurrent connections (server pinned to one core, the load "
             "generator on the other), requests/s:\n\n")
    header = ["", *[_cell_header(m, e) for m, e in CELLS]]
    rows = []
    for server, label in ((BN, "`bnfold serve`"), (NAIVE, "naive FastAPI + PyTorch eager (unfolded)"),
                          (BENTO, "BentoML, same ONNX, adaptive batching")):
        cells = []
        for model, encoding in CELLS:
            r = _row(serve, server, model, encoding, 32)
            cells.append("-" if r is None else (f"**{r['rps']:.0f}**" if server == BN else f"{r['rps']:.0f}"))
        rows.append([label, *cells])
    text += common.markdown_table(header, rows)
    gaps = [t["value"] for t in serve["targets"] if t["target"].startswith("c=1 p50")]
    fit = cost["fits"]["total"]
    totals = [a["total_s"] for a in cost["architectures"]]
    text += (f"\nMedian latency of a lone request is within {min(gaps):.2f}-{max(gaps):.2f} ms of calling "
             f"onnxruntime in-process. Fold + verify + export takes {min(totals):.2f}-{max(totals):.2f} s per "
             f"model and grows linearly with depth ({fit['slope_s_per_layer'] * 1e3:.0f} ms per batch norm, "
             f"R^2 {fit['r2']:.3f}).\n\n")
    return text


def replace_block(path: Path, name: str, text: str) -> None:
    """Replace what is between ``<!-- bench:name -->`` and ``<!-- /bench:name -->`` in ``path``."""
    source = path.read_text()
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(source):
        raise ValueError(f"{path} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    path.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), source))


def update_readmes(out: Path = common.RESULTS) -> None:
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in ("folding", "fold_cost", "serving")}
    bench_readme = common.BENCH / "README.md"
    replace_block(bench_readme, "run", f"Checked-in {load_averages(results)}.\n")
    replace_block(bench_readme, "folding", folding_table(results["folding"]))
    replace_block(bench_readme, "serving", serving_table(results["serving"]) + "\n" + latency_table(results["serving"]))
    replace_block(bench_readme, "summary", (out / "summary.md").read_text().split("\n\n", 1)[1])
    if (out / "route_overhead.md").exists():
        replace_block(bench_readme, "route_overhead", (out / "route_overhead.md").read_text())
    replace_block(common.ROOT / "README.md", "summary", main_readme(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="results directory")
    args = parser.parse_args(argv)
    update_readmes(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
