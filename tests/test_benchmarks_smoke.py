"""Smoke run of every benchmark (``benchmarks/run_all.py --smoke``): outputs exist and hold sane values.

Nothing here asserts speed (performance claims live in benchmarks/results); it asserts that each
benchmark runs end to end, measures what it says, and that every server answered correctly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import fold_cost, loadgen, report  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _load(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", [
    pytest.param(n, id=n) for n in ("folding.json", "folding.md", "folding.png", "fold_cost.json", "fold_cost.md",
                                    "fold_cost.png", "serving.json", "serving.md", "serving.png", "route_overhead.json",
                                    "route_overhead.md", "summary.md")])
def test_output_written(smoke: Path, name: str) -> None:
    path = smoke / name
    assert path.is_file() and path.stat().st_size > 100
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folding_values(smoke: Path) -> None:
    body = _load(smoke, "folding")
    assert body["machine"]["cores"] >= 1 and len(body["machine"]["load_average_1_5_15"]) == 3
    assert {r["model"] for r in body["results"]} == {"mlp", "cnn"}
    for r in body["results"]:
        assert 0.3 < r["val_accuracy"] <= 1.0  # trained by bnfold.train (one epoch); a sanity bound, not a quality bar
        assert r["batchnorms"]["kept"] == 0 and r["batchnorms"]["folded"] >= 3
        f = r["file"]
        assert f["folded_nodes"] < f["unfolded_nodes"]
        assert "BatchNormalization" in f["unfolded_ops"] and "BatchNormalization" not in f["folded_ops"]
        assert 0 < f["folded_certificate_bytes"] < f["folded_bytes"]
        assert {(lat["runtime"], lat["batch"]) for lat in r["latency"]} == {
            (rt, b) for rt in ("pytorch eager", "onnxruntime (opt off)", "onnxruntime (opt on)") for b in (1, 32)}
        for lat in r["latency"] + r["session_creation"]:
            assert _positive(lat["unfolded_ms"]) and _positive(lat["folded_ms"])
            assert lat["ratio"] == pytest.approx(lat["unfolded_ms"] / lat["folded_ms"], rel=1e-12)


def test_fold_cost_values(smoke: Path) -> None:
    body = _load(smoke, "fold_cost")
    assert [d["norm_layers"] for d in body["depth"]] == [4, 6, 8]
    for row in body["architectures"] + body["depth"]:
        assert _positive(row["total_s"]) and row["kept"] == 0
        assert row["total_s"] == pytest.approx(sum(row["steps_s"].values()), rel=0.5)  # medians of sums vs sums
    fit = body["fits"]["total"]
    assert math.isfinite(fit["r2"]) and fit["r2"] <= 1.0 and math.isfinite(fit["loglog_slope"])


@pytest.mark.parametrize(("x", "y", "slope", "intercept"), [
    pytest.param([1, 2, 3, 4], [3, 5, 7, 9], 2.0, 1.0, id="exact-line"),
    pytest.param([8, 16, 32, 64], [0.8, 1.6, 3.2, 6.4], 0.1, 0.0, id="proportional"),
])
def test_linear_fit(x: list[float], y: list[float], slope: float, intercept: float) -> None:
    fit = fold_cost.linear_fit(x, y)
    assert fit["slope_s_per_layer"] == pytest.approx(slope, abs=1e-12)
    assert fit["intercept_s"] == pytest.approx(intercept, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    if intercept == 0:
        assert fit["loglog_slope"] == pytest.approx(1.0, abs=1e-12)


def test_serving_values(smoke: Path) -> None:
    body = _load(smoke, "serving")
    servers = {r["server"] for r in body["results"]}
    assert servers == {"bnfold serve (batching)", "naive FastAPI + PyTorch", "in-process onnxruntime"}
    for r in body["results"]:
        assert r["errors"] == 0 and _positive(r["rps"]) and 0 < r["p50_ms"] <= r["p99_ms"]
    assert len(body["checks"]) == 4 and all(c["max_abs_error_vs_inprocess"] <= 1e-4 for c in body["checks"])
    assert all(_positive(g["rps"]) and g["errors"] == 0 for g in body["generator_ceiling"])
    assert {t["target"] for t in body["targets"]} >= {"c=1 p50 within 1 ms of in-process onnxruntime"}


def test_asyncio_generator_counts_errors_and_latency(tmp_path: Path) -> None:
    """The fallback generator against the trivial endpoint (200s), then against a closed port (errors)."""
    from benchmarks.serving import free_port, server

    port = free_port()
    with server([sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--serve-trivial", str(port)],
                f"http://127.0.0.1:{port}/", log=tmp_path / "trivial.log"):
        load = loadgen.run_asyncio(f"http://127.0.0.1:{port}/x", b"{}", {"Content-Type": "application/json"},
                                   concurrency=4, seconds=0.5)
    assert load.generator == "asyncio" and load.errors == 0 and load.requests > 10
    assert load.rps == pytest.approx(load.requests / load.seconds, rel=1e-9)
    assert 0 < load.p50_ms <= load.p99_ms
    with pytest.raises(RuntimeError, match=r"load generator failed|no response"):
        loadgen.run_asyncio(f"http://127.0.0.1:{free_port()}/x", b"{}", {}, concurrency=2, seconds=0.2)


def test_route_overhead_values(smoke: Path) -> None:
    body = _load(smoke, "route_overhead")
    routes = {r["route"] for r in body["results"]}
    assert routes == {"FastAPI route (as served)", "FastAPI route, no dependencies", "raw Starlette route"}
    assert {(r["model"], r["encoding"]) for r in body["results"]} == {("cnn", "json"), ("cnn", "binary")}
    for r in body["results"]:
        assert _positive(r["rps"]) and _positive(r["server_cpu_ms_per_request"])


def test_report_renders_the_smoke_results(smoke: Path, tmp_path: Path) -> None:
    results = {n: _load(smoke, n) for n in ("folding", "fold_cost", "serving")}
    folding = report.folding_table(results["folding"])
    assert folding.count("\n") == 2 + len(results["folding"]["results"]) and "nan" not in folding
    serving = report.serving_table(results["serving"], c=8)
    assert "bnfold serve (batching)" in serving and "naive FastAPI + PyTorch" in serving and "nan" not in serving
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:t -->\nold\n<!-- /bench:t -->\nrest\n")
    report.replace_block(readme, "t", serving)
    assert readme.read_text() == f"# x\n<!-- bench:t -->\n{serving}<!-- /bench:t -->\nrest\n"
    with pytest.raises(ValueError, match="no <!-- bench:missing -->"):
        report.replace_block(readme, "missing", "text")


def _row(server: str, model: str, encoding: str, c: int, rps: float, p50: float) -> dict[str, Any]:
    return {"server": server, "model": model, "encoding": encoding, "concurrency": c, "rps": rps, "p50_ms": p50,
            "p99_ms": p50, "server_cpu_ms_per_request": 0.1}


def test_serving_goals_and_ceiling_shares_from_rows() -> None:
    """Issue 16's goals read one run's rows: share of the ceiling, c=1 p50 gap, gain over the baseline tree."""
    from benchmarks import serving

    bn, ceil, before = "bnfold serve (batching)", "in-process onnxruntime", "bnfold serve, before"
    body = {"settings": {"baseline": {"label": before, "tree": "/x"}}, "results": [
        _row(bn, "cnn", "binary", 32, 930.0, 1.0), _row(ceil, "cnn", "none", 32, 1000.0, 1.0),
        _row(bn, "cnn", "binary", 1, 800.0, 0.35), _row(ceil, "cnn", "none", 1, 4000.0, 0.30),
        _row(before, "cnn", "binary", 32, 600.0, 2.0)]}
    goals = {g["target"]: g for g in serving._goals(body, "cnn", "binary")}
    assert goals["c=32 req/s >= 0.92 of in-process onnxruntime"]["value"] == pytest.approx(0.93)
    assert goals["c=32 req/s >= 0.92 of in-process onnxruntime"]["met"]
    assert goals["c=1 p50 within 0.1 ms of in-process onnxruntime"]["value"] == pytest.approx(0.05)
    assert goals[f"c=32 req/s >= 1.5x {before}"]["value"] == pytest.approx(1.55)
    header, *rows = serving.ceiling_shares(body)
    assert header == ["server", "cnn json", "cnn binary"]
    assert rows == [[bn, "-", "0.93"], [before, "-", "0.60"]]


@pytest.mark.parametrize(("frames", "stage"), [
    pytest.param(["run (service/main.py:1)", "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:4)"],
                 "onnxruntime", id="onnxruntime"),
    pytest.param(["InferenceEndpoints._run (service/api/fastpath.py:1)", "infer (service/inference.py:2)",
                  "decode_infer_request (service/codec.py:3)", "loads (service/codec.py:4)"], "JSON decode",
                 id="json-decode"),
    pytest.param(["decode_infer_request (service/codec.py:3)", "_from_binary (service/codec.py:5)"],
                 "array building", id="array-building"),
    pytest.param(["InferenceEndpoints.__call__ (service/api/fastpath.py:1)", "_send (service/api/fastpath.py:2)",
                  "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:524)"],
                 "HTTP + ASGI (uvicorn, httptools)", id="http-inside-the-fast-path"),
    pytest.param(["Batcher._execute (service/batching.py:1)", "ModelRuntime.run (service/runtime.py:2)",
                  "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:4)"], "onnxruntime",
                 id="onnxruntime-in-a-batch"),
    pytest.param(["Server.run (uvicorn/server.py:1)", "Runner.run (asyncio/runners.py:118)"],
                 "socket I/O and event loop", id="event-loop-c-code"),
    pytest.param(["thread (1)", "Thread._bootstrap (threading.py:1)"], "socket I/O and event loop", id="other"),
])
def test_profile_samples_are_assigned_to_stages(frames: list[str], stage: str) -> None:
    from benchmarks.serving_profile import classify

    assert classify(frames) == stage
