"""Smoke run of every benchmark (``benchmarks/run_all.py --smoke``): outputs exist and hold sane values.

Nothing here asserts speed (performance claims live in benchmarks/results); it asserts that each
benchmark runs end to end, measures what it says, and that every server answered correctly.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, fold_cost, loadgen, report, serving  # noqa: E402
from benchmarks.serving import goal_verdicts as serving_goal_verdicts  # noqa: E402

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
    assert servers == {"bnfold serve (batching)", "naive FastAPI + PyTorch", "Python floor (no checks)",
                       "Python floor + bnfold's checks", "in-process onnxruntime"}
    for r in body["results"]:
        assert r["errors"] == 0 and _positive(r["rps"]) and 0 < r["p50_ms"] <= r["p99_ms"]
    assert len(body["checks"]) == 8 and all(c["max_abs_error_vs_inprocess"] <= 1e-4 for c in body["checks"])
    assert all(c["concurrent_requests"] == serving.CONCURRENT_CHECK and c["max_abs_error_concurrent"] <= 1e-4
               for c in body["checks"])
    assert all(_positive(g["rps"]) and g["errors"] == 0 for g in body["generator_ceiling"])
    assert body["latency_floor"] == next(g for g in body["generator_ceiling"] if g["concurrency"] == 1)
    assert {t["target"] for t in body["targets"]} >= {"c=1 p50 within 1 ms of in-process onnxruntime"}
    # The ceiling was measured in slices beside each encoding's servers, not once at the end.
    ceilings = [r for r in body["results"] if r["server"] == "in-process onnxruntime"]
    assert sorted(r["concurrency"] for r in ceilings) == [1, 8]
    for r in ceilings:
        assert set(r["beside"]) == {"json", "binary"} and r["requests"] >= 2 * 5 * r["concurrency"]
        assert all(_positive(b["rps"]) for b in r["beside"].values())
    assert body["goals"] == serving_goal_verdicts(body)
    assert body["goals"] and {v["verdict"] for v in body["goals"]} <= {"met", "floor misses it too", "the checks",
                                                                   "bnfold overhead"}


def test_serving_ab_measures_each_tree_over_fresh_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import serving_ab

    out = tmp_path / "ab.json"
    assert serving_ab.main([str(ROOT), "floor", "--samples", "3", "--restarts", "2", "--seconds", "0.5",
                            "-c", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["samples"], result["restarts"]) == (3, 2)
    ours, floor = result["rows"]
    assert (ours["tree"], floor["tree"]) == (str(ROOT), "floor")
    for row in result["rows"]:
        assert len(row["rps_samples"]) == len(row["cpu_us_samples"]) == len(row["p50_ms_samples"]) == 3
        assert all(map(_positive, row["rps_samples"])) and all(map(_positive, row["p50_ms_samples"]))
        assert row["p50_ms"] == statistics.median(row["p50_ms_samples"])
    assert ours["rps_ratio"] == 1.0 and floor["rps_ratio"] == pytest.approx(floor["rps"] / ours["rps"])
    assert "| floor |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a bnfold source tree"):
        serving_ab.main([str(tmp_path), "floor", "--samples", "1"])


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


def _ceiling(model: str, c: int, rps: float, p50: float, beside: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {**_row("in-process onnxruntime", model, "none", c, rps, p50),
            "beside": {e: {"rps": r, "p50_ms": p, "p99_ms": p} for e, (r, p) in beside.items()}}


def test_serving_goals_beside_the_floor_from_rows() -> None:
    """Each goal shows bnfold and both floors; a miss is the floor's too (beyond it), the checked floor's (the
    checks), or bnfold's alone (overhead)."""
    from benchmarks import serving

    bn, floor, before = "bnfold serve (batching)", "Python floor (no checks)", "bnfold serve, before"
    checks = "Python floor + bnfold's checks"
    body: dict[str, Any] = {"settings": {"baseline": {"label": before, "tree": "/x"}}, "results": [
        # resnet binary: the floor meets 0.92 of the ceiling, bnfold does not (overhead)
        _row(bn, "resnet", "binary", 32, 800.0, 40.0), _row(floor, "resnet", "binary", 32, 940.0, 30.0),
        # resnet json: both miss 0.75 (the floor misses it too); the ceiling of json's rounds is 900, not the median 950
        _row(bn, "resnet", "json", 32, 450.0, 60.0), _row(floor, "resnet", "json", 32, 630.0, 50.0),
        _ceiling("resnet", 32, 950.0, 33.0, {"json": (900.0, 35.0), "binary": (1000.0, 32.0)}),
        # cnn binary c=1: bnfold within 0.1 ms (met); cnn json c=1: neither (the floor misses it too)
        _row(bn, "cnn", "binary", 1, 3000.0, 0.12), _row(floor, "cnn", "binary", 1, 4000.0, 0.10),
        _row(bn, "cnn", "json", 1, 2000.0, 0.45), _row(floor, "cnn", "json", 1, 3000.0, 0.25),
        _ceiling("cnn", 1, 20000.0, 0.05, {"json": (20000.0, 0.05), "binary": (20000.0, 0.05)}),
        # cnn binary c=32: 1.4x the baseline, the floor 5x; no floor row for json (not measured)
        _row(bn, "cnn", "binary", 32, 1400.0, 20.0), _row(floor, "cnn", "binary", 32, 5000.0, 6.0),
        _row(before, "cnn", "binary", 32, 1000.0, 30.0), _row(bn, "cnn", "json", 32, 1600.0, 20.0),
        _row(before, "cnn", "json", 32, 1000.0, 30.0),
        # resnet binary c=32: the checked floor meets it too (0.93): still bnfold's overhead
        _row(checks, "resnet", "binary", 32, 930.0, 31.0),
        # resnet binary c=1: the floor within 0.1 ms, the checked floor not (the checks), bnfold not
        _row(bn, "resnet", "binary", 1, 1000.0, 0.30), _row(floor, "resnet", "binary", 1, 2000.0, 0.12),
        _row(checks, "resnet", "binary", 1, 1500.0, 0.20),
        _ceiling("resnet", 1, 3000.0, 0.05, {"json": (3000.0, 0.05), "binary": (3000.0, 0.05)})]}
    got = {(v["goal"], v["model"], v["encoding"]): v for v in serving.goal_verdicts(body)}
    share92, share75 = "c=32 req/s >= 0.92 of in-process onnxruntime", "c=32 req/s >= 0.75 of in-process onnxruntime"
    p50, gain = "c=1 p50 within 0.1 ms of in-process onnxruntime", f"c=32 req/s >= 1.5x {before}"
    overhead = got[share92, "resnet", "binary"]
    assert (overhead["bnfold"], overhead["floor"]) == (pytest.approx(0.80), pytest.approx(0.94))
    assert overhead["verdict"] == "bnfold overhead" and not overhead["met"] and overhead["floor_met"]
    assert overhead["floor_checks"] == pytest.approx(0.93) and overhead["floor_checks_met"]
    by_checks = got[p50, "resnet", "binary"]
    assert (by_checks["bnfold"], by_checks["floor"], by_checks["floor_checks"]) == \
        (pytest.approx(0.25), pytest.approx(0.07), pytest.approx(0.15))
    assert by_checks["verdict"] == "the checks" and by_checks["floor_met"] and not by_checks["floor_checks_met"]
    beyond = got[share75, "resnet", "json"]
    assert (beyond["bnfold"], beyond["floor"]) == (pytest.approx(0.50), pytest.approx(0.70))
    assert beyond["verdict"] == "floor misses it too" and beyond["floor_checks"] is None
    assert got[p50, "cnn", "binary"]["verdict"] == "met"
    assert got[p50, "cnn", "binary"]["bnfold"] == pytest.approx(0.07)
    assert got[p50, "cnn", "json"]["verdict"] == "floor misses it too"
    assert got[p50, "cnn", "json"]["floor"] == pytest.approx(0.20)
    assert got[gain, "cnn", "binary"]["verdict"] == "bnfold overhead"
    assert got[gain, "cnn", "binary"]["floor"] == pytest.approx(5.0)
    assert got[gain, "cnn", "json"]["verdict"] == "met"
    assert got[gain, "cnn", "json"]["floor"] is None
    header, *rows = serving.floor_shares(body)
    assert header == ["server", "cnn json", "cnn binary", "resnet json", "resnet binary"]
    assert rows == [[bn, "-", "0.28", "0.71", "0.85"], [before, "-", "0.20", "-", "-"], [checks, "-", "-", "-", "0.99"]]
    header, *rows = serving.ceiling_shares(body)
    assert rows[:2] == [[bn, "-", "-", "0.50", "0.80"], [floor, "-", "-", "0.70", "0.94"]]
    text = serving.markdown({**body, "machine": {"load_average_1_5_15": [1.0, 1.0, 1.0]}, "generator_ceiling": [],
                             "targets": [], "latency_floor": {"concurrency": 1, "p50_ms": 0.18},
                             "settings": {**body["settings"], "generator": "wrk", "generator_cpus": [1],
                                          "server_cpus": [0], "seconds_per_point": 1.0, "concurrency": [1, 32]}})
    assert "| c=32 req/s >= 0.75 of in-process onnxruntime | resnet | json | 0.50 | 0.70 | - | " \
           "**not met**: floor misses it too |" in text
    assert "| c=1 p50 within 0.1 ms of in-process onnxruntime | resnet | binary | 0.25 ms | 0.07 ms | 0.15 ms | " \
           "**not met**: the checks |" in text
    assert "c=1 in p50 0.180 ms" in text


def test_serving_ceiling_rows_from_slices() -> None:
    """The ceiling row of a (model, c) is the median of every slice; ``beside`` holds each encoding's rounds."""
    from benchmarks import serving

    def ceil(rps: float, p50: float) -> loadgen.Load:
        return loadgen.Load("none", 8, 1.0, 800, 0, rps, p50, 2 * p50)

    slices = {("cnn", "json", 8): [ceil(100.0, 1.0), ceil(300.0, 3.0), ceil(200.0, 2.0)],
              ("cnn", "binary", 8): [ceil(400.0, 4.0), ceil(600.0, 6.0)]}
    (row,) = serving.ceiling_rows(slices)
    assert (row["server"], row["model"], row["encoding"], row["concurrency"]) == ("in-process onnxruntime", "cnn",
                                                                                   "none", 8)
    assert (row["rps"], row["p50_ms"], row["requests"]) == (300.0, 3.0, 4000)
    assert row["server_cpu_ms_per_request"] == pytest.approx(3.0 / 8)
    assert row["beside"] == {"json": {"rps": 200.0, "p50_ms": 2.0, "p99_ms": 4.0},
                             "binary": {"rps": 500.0, "p50_ms": 5.0, "p99_ms": 10.0}}


@pytest.mark.parametrize(("frames", "stage"), [
    pytest.param(["run (service/main.py:1)", "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:4)"],
                 "onnxruntime", id="onnxruntime"),
    pytest.param(["InferenceEndpoints._run (service/api/fastpath.py:1)", "infer (service/inference.py:2)",
                  "decode_infer_request (service/codec.py:3)", "loads (service/codec.py:4)"], "JSON decode",
                 id="json-decode"),
    pytest.param(["Decoder.decode (service/codec.py:3)", "_Plan.request (service/codec.py:5)",
                  "_Binary.array (service/codec.py:6)"], "array building", id="array-building"),
    pytest.param(["InferenceEndpoints.__call__ (service/api/fastpath.py:1)", "_send (service/api/fastpath.py:2)",
                  "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:524)"],
                 "HTTP (httptools, uvicorn, direct path)", id="http-inside-the-fast-path"),
    pytest.param(["HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py:174)",
                  "LimitedHttpToolsProtocol._start_direct (service/protocol.py:290)"],
                 "HTTP (httptools, uvicorn, direct path)", id="http-direct-path"),
    pytest.param(["LimitedHttpToolsProtocol._serve_direct (service/protocol.py:350)",
                  "InferenceEndpoints.answer (service/api/fastpath.py:90)", "infer (service/inference.py:56)",
                  "Batcher.submit (service/batching.py:172)"], "queueing + hand-off",
                 id="direct-path-into-the-batcher"),
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


def test_a_server_busy_while_idle_is_found_and_kept_stopped_outside_its_slices() -> None:
    """serving.py stops (SIGSTOP) a server that takes the server CPU while idle, except in its own slices."""
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import time\nprint('up', flush=True)\n{code}"],
                                    start_new_session=True, stdout=subprocess.PIPE)
             for name, code in (("spins", "while True: pass"), ("sleeps", "time.sleep(600)"))}
    try:
        for proc in procs.values():  # started: the interpreter's own start-up is not idle CPU
            assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        pids = {name: proc.pid for name, proc in procs.items()}
        shares = serving.idle_cpu_shares(pids, seconds=1.0)
        assert shares["spins"] > serving.IDLE_BUSY > shares["sleeps"]
        pauser = serving.Pauser({"spins": pids["spins"]})
        try:
            time.sleep(0.2)  # the stop has landed
            stopped = common.tree_cpu_seconds(pids["spins"])
            time.sleep(0.5)
            assert common.tree_cpu_seconds(pids["spins"]) == stopped  # no CPU at all while stopped
            with pauser.running("spins"):
                deadline = time.monotonic() + 30
                while common.tree_cpu_seconds(pids["spins"]) == stopped and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert common.tree_cpu_seconds(pids["spins"]) > stopped  # it runs in its own slice
            with pauser.running("sleeps"):  # not a paused server: nothing to do
                pass
        finally:
            pauser.close()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_point_where_no_request_finished_is_said_so_not_drawn_as_zero_latency() -> None:
    row = {"server": "slow", "model": "cnn", "encoding": "json", "concurrency": 64, "requests": 0, "errors": 0,
           "rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "server_cpu_ms_per_request": 1830.0}
    assert serving._latency(row) == "none answered in a slice" and serving._cpu(row) == "-"
    assert serving._latency({**row, "requests": 5, "p50_ms": 1.0, "p99_ms": 2.0}) == "1.00 / 2.00"


def test_generator_ceilings_measure_each_trivial_server_and_its_cpu(tmp_path: Path) -> None:
    """Both trivial servers answer their generator, and their CPU per request (the protocol's floor) is reported."""
    import numpy as np

    from benchmarks import grpc_load

    pytest.importorskip("grpc")
    request = grpc_load.infer_request("cnn", np.zeros((1, 1, 8, 8), np.float32))
    rows = grpc_load.ceilings((1, 4), 0.4, (b"{}", {"Content-Type": "application/json"}), request, set(), None,
                              tmp_path)
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [("http", 1), ("http", 4), ("grpc", 1), ("grpc", 4)]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 5 and row["server_cpu_ms_per_request"] > 0, row
    body = {"rows": [], "ceilings": rows, "server_cpus": [], "generator_cpus": [], "seconds_per_point": 0.4,
            "rounds": 1, "load_average": [0, 0, 0]}
    text = grpc_load.markdown(body)
    assert "| grpc | 4 |" in text and "server CPU ms/req" in text
    old = {**body, "ceilings": [{k: v for k, v in r.items() if k != "server_cpu_ms_per_request"} for r in rows]}
    assert "not measured" in grpc_load.markdown(old)  # a run from before the CPU column still renders


def test_peer_versions_are_read_from_the_peer_interpreter_and_shown(tmp_path: Path) -> None:
    import onnxruntime

    found = serving.peer_versions(Path(sys.executable), ("pytest", "no-such-distribution"))
    assert found == {"pytest": pytest.__version__, "no-such-distribution": "missing",
                     "onnxruntime": onnxruntime.__version__}
    assert serving.peer_versions(tmp_path / "no-python", ("kserve",)) == {"kserve": "unknown", "onnxruntime": "unknown"}


def test_the_concurrent_check_finds_an_answer_that_belongs_to_another_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows mixed up within a batch: each answer is compared with its own input's output, not any output."""
    import numpy as np

    samples = np.arange(4 * 3, dtype=np.float32).reshape(4, 1, 3)
    want = samples.reshape(4, 3) * 2  # a "model" doubling its input
    model = serving.Model("m", Path("unused.pt"), Path("unused.onnx"), [1, 3], samples[:1])
    target = serving.Target("server", [], "", {"m": "http://unused/infer"}, ("json",))

    def answer(swap: bool) -> Any:
        def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
            x = np.asarray(json.loads(body)["inputs"][0]["data"], np.float32)
            if swap and x[0] in (0.0, 3.0):  # requests 0 and 1 get each other's answer
                x = x + (3.0 if x[0] == 0.0 else -3.0)
            out = {"outputs": [{"name": "y", "shape": [1, 3], "datatype": "FP32", "data": (x * 2).tolist()}]}
            return json.dumps(out).encode(), {"content-type": "application/json"}
        return post

    monkeypatch.setattr(serving, "post", answer(swap=False))
    assert serving.check_concurrent(target, model, "json", samples, want) == 0.0
    monkeypatch.setattr(serving, "post", answer(swap=True))
    with pytest.raises(RuntimeError, match=r"answered request [01] of 4 concurrent ones for m \(json\)"):
        serving.check_concurrent(target, model, "json", samples, want)


def test_wait_quiet_measures_the_cpus_busy_share_and_gives_up_in_time() -> None:
    import os

    cpus = os.sched_getaffinity(0)
    began = time.monotonic()
    share = common.wait_quiet(cpus, busy_below=0.0, window_s=0.2, max_s=0.5)  # never quiet enough: gives up
    assert 0.0 <= share <= 1.0 and time.monotonic() - began < 5
    busy, total = common._busy_and_total(cpus)
    assert 0 <= busy <= total and total > 0


def test_collapsed_stacks_are_parsed_heaviest_first_and_a_cut_line_is_counted_not_fatal() -> None:
    from benchmarks.serving_profile import parse_collapsed

    raw = "a (x.py:1);b (y.py:2) 3\nc (z.py:9) 7\nd (service/protocol.py:349);\n\na (x.py:1) 1\n"
    assert parse_collapsed(raw) == ([("c (z.py:9)", 7), ("a (x.py:1);b (y.py:2)", 3), ("a (x.py:1)", 1)], 1)
