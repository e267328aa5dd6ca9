"""PNG plots of the three result files (matplotlib, Agg): folding.png, fold_cost.png, serving.png.

Run: ``python benchmarks/plots.py [--out benchmarks/results]`` re-draws from the JSON files in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _subtitle(body: dict[str, Any]) -> str:
    m = body["machine"]
    return f"{m['cpu']}, {m['cores']} cores, load avg {m['load_average_1_5_15'][0]:.1f}, {m['date_utc'][:10]}"


def folding(body: dict[str, Any], path: Path) -> None:
    """Grouped bars: unfolded/folded latency ratio per model, one group per runtime and batch."""
    import numpy as np

    fig, axes = _figure(11, 4.2)
    ax = axes[0][0]
    results = body["results"]
    keys = [(lat["runtime"], lat["batch"]) for lat in results[0]["latency"]]
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        by = {(lat["runtime"], lat["batch"]): lat["ratio"] for lat in r["latency"]}
        ax.bar(np.arange(len(keys)) + (i - (len(results) - 1) / 2) * width, [by[k] for k in keys], width,
               label=r["model"])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.1, color="tab:red", lw=0.8, ls="--", label="1.10x target (eager, batch 1)")
    ax.set_xticks(np.arange(len(keys)), [f"{rt}\nbatch {b}" for rt, b in keys], fontsize=8)
    ax.set_ylabel("unfolded / folded latency (higher = folding helps)")
    ax.set_title(f"Folding speedup, median of interleaved runs, 1 thread\n{_subtitle(body)}", fontsize=10)
    ax.legend(fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def fold_cost(body: dict[str, Any], path: Path) -> None:
    """Left: total time against normalization layers with the linear fit; right: per-step stack."""
    fig, axes = _figure(11, 4.2, 1, 2)
    ax = axes[0][0]
    depth = body["depth"]
    n = [d["norm_layers"] for d in depth]
    ax.plot(n, [d["total_s"] for d in depth], "o", label="measured (median)")
    fit = body["fits"]["total"]
    ax.plot(n, [fit["intercept_s"] + fit["slope_s_per_layer"] * x for x in n], "-",
            label=f"fit {fit['intercept_s']:.2f} s + {fit['slope_s_per_layer'] * 1e3:.1f} ms x n, R^2 {fit['r2']:.3f}")
    ax.set_xlabel("normalization layers (resnet, 1 stage)")
    ax.set_ylabel("fold + verify + export + certify (s)")
    ax.set_title("Fold cost against depth", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    archs = body["architectures"]
    bottom = [0.0] * len(archs)
    for step in ("fold", "verify", "export", "verify_onnx", "certify"):
        values = [a["steps_s"][step] for a in archs]
        ax.bar([a["model"] for a in archs], values, bottom=bottom, label=step)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Per architecture, by step\n{_subtitle(body)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def serving(body: dict[str, Any], path: Path) -> None:
    """Per model: requests/s and p50 latency against concurrency, one line per server and body encoding."""
    rows = body["results"]
    models = sorted({r["model"] for r in rows})
    fig, axes = _figure(12, 4.0 * len(models), len(models), 2)
    styles = {"json": "-", "binary": "--", "none": ":"}
    servers = list(dict.fromkeys(r["server"] for r in rows))
    from matplotlib import colormaps

    palette = colormaps["tab20"]  # 20 distinct colours: the dark ten first, then their light shades
    colors = {s: palette((2 * i) % 20 + (2 * i) // 20) for i, s in enumerate(servers)}
    for row_axes, model in zip(axes, models, strict=True):
        silent_notes = []
        for server in servers:
            for encoding in ("json", "binary", "none"):
                series = [r for r in rows
                          if r["server"] == server and r["model"] == model and r["encoding"] == encoding]
                pts = sorted((r["concurrency"], r["rps"], r["p50_ms"]) for r in series if r.get("requests", 1))
                if not pts:
                    continue
                c, rps, p50 = zip(*pts, strict=True)
                label = f"{server} (latency: one run of the batch)" if encoding == "none" else f"{server}, {encoding}"
                silent = sorted(r["concurrency"] for r in series if not r.get("requests", 1))
                if silent:  # no request finished within a slice: no point to draw, said in the panel's title
                    silent_notes.append(f"{label} at c={', '.join(map(str, silent))}")
                row_axes[0].plot(c, rps, styles[encoding], marker="o", color=colors[server], label=label)
                row_axes[1].plot(c, p50, styles[encoding], marker="o", color=colors[server], label=label)
        ceiling = sorted((g["concurrency"], g["rps"]) for g in body["generator_ceiling"])
        if ceiling:
            c, rps = zip(*ceiling, strict=True)
            row_axes[0].plot(c, rps, color="gray", lw=3, alpha=0.4,
                             label="load generator ceiling (trivial endpoint, largest JSON body)")
        for ax, ylabel in zip(row_axes, ("requests/s", "p50 latency (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent connections (batch-1 requests)")
            ax.set_ylabel(ylabel)
            note = f"\nno answer within a slice, not drawn: {'; '.join(silent_notes)}" if silent_notes else ""
            ax.set_title(f"{model}: {ylabel}{note}", fontsize=10 if not note else 8)
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    s = body["settings"]
    fig.suptitle(f"Serving, server on CPU {s['server_cpus']}, {s['generator']} on CPU {s['generator_cpus']}; "
                 f"{_subtitle(body)}", fontsize=10)
    fig.savefig(path, dpi=100)


def draw(out: Path) -> list[Path]:
    """Draw every plot whose JSON exists in ``out``; returns the PNG paths written."""
    written = []
    for name, fn in (("folding", folding), ("fold_cost", fold_cost), ("serving", serving)):
        src = out / f"{name}.json"
        if src.exists():
            fn(json.loads(src.read_text()), out / f"{name}.png")
            written.append(out / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="results directory")
    args = parser.parse_args(argv)
    for p in draw(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
