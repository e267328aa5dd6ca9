"""Model control against a real ``python -m service`` process, driven by tritonclient.http and a load generator.

Poll mode: a version published while clients run goes live with no failed request, answers switch
from the old version to the new at one point, and a broken newer version is reported not ready
while the current one serves. Explicit mode: tritonclient's index/load/unload calls work unchanged,
and an unload under load lets in-flight requests finish (every answer is a 200 from the model or a
404 "unknown model", never an error or a dropped connection).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from server_process import free_port, is_ready, log_text, start, stop, wait_until
from service_models import certified, gemm_model, gemm_reference
from tritonclient.utils import InferenceServerException

from bnfold.repository import publish
from service.runtime import ModelRuntime

pytestmark = pytest.mark.slow
DEADLINE_S = 120.0  # for a change to go live on a loaded 2-core machine; an idle one takes about a second
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
SERVERS: dict[str, subprocess.Popen[bytes]] = {}  # url -> the server process, for its log
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": X.ravel().tolist()}]}


def _model(seed: int, tamper: float = 0.0) -> bytes:
    return certified(gemm_model(seed), seed, tamper=tamper).SerializeToString()


def _version_of(body: dict[str, Any]) -> int:
    """The answering version, after checking the logits are that version's (float64 reference)."""
    version = int(body["model_version"])
    got = np.array(body["outputs"][0]["data"], dtype=np.float64)
    want = gemm_reference(version, X).ravel()
    assert np.max(np.abs(got - want)) <= 1e-5 + 1e-4 * np.max(np.abs(want)), (version, got, want)
    return version


@dataclass
class Answer:
    started: int  # time.monotonic_ns() before the request was sent
    finished: int  # ... and after its answer arrived
    status: int
    version: int | None


class LoadGenerator:
    """``lanes`` threads sending inference requests without a version until :meth:`stop`."""

    def __init__(self, url: str, lanes: int = 4, fresh_connections: bool = False, model: str = "m",
                 body: dict[str, Any] = BODY, check: Callable[[dict[str, Any]], int] = _version_of,
                 pause_s: float = 0.0) -> None:
        self.url, self.pause_s = url, pause_s
        self.fresh_connections = fresh_connections
        self.path, self.body, self.check = f"/v2/models/{model}/infer", body, check
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._lane, daemon=True) for _ in range(lanes)]
        for thread in self._threads:
            thread.start()

    def _lane(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0) if self.fresh_connections else httpx.Limits()
        with httpx.Client(base_url=f"http://{self.url}", timeout=60, limits=limits) as client:
            while not self._stop.is_set():
                started = time.monotonic_ns()
                try:
                    response = client.post(self.path, json=self.body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                finished = time.monotonic_ns()
                version = self.check(response.json()) if response.status_code == 200 else None
                with self._lock:
                    self.answers.append(Answer(started, finished, response.status_code, version))
                    if response.status_code not in (200, 404):
                        self.failures.append(f"{response.status_code} {response.text}")
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def count(self, version: int) -> int:
        with self._lock:
            return sum(a.version == version for a in self.answers)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE_S:.0f} s"
        time.sleep(0.05)


@contextlib.contextmanager
def _serve(root: Path, mode: str, workers: str = "1") -> Iterator[str]:
    """A server over ``root`` in ``mode``, polling every 0.2 s; yields its ``host:port``."""
    port = free_port()
    env = {**os.environ, "BNFOLD_MODEL_REPOSITORY": str(root), "BNFOLD_PORT": str(port),
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_INTRA_OP_THREADS": "1", "BNFOLD_MODEL_CONTROL": mode,
           "BNFOLD_REPOSITORY_POLL_S": "0.2", "BNFOLD_WORKERS": workers}
    process = start(env)
    SERVERS[f"127.0.0.1:{port}"] = process
    try:
        wait_until(process, lambda: is_ready(f"http://127.0.0.1:{port}"), "readiness")
        yield f"127.0.0.1:{port}"
    finally:
        stop(process)
        del SERVERS[f"127.0.0.1:{port}"]


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    mode, _, workers = str(request.param).partition("-")  # "poll", "explicit" or "poll-2" (two workers)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(_model(1))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    with _serve(tmp_path, mode, workers or "1") as url:
        yield url


@pytest.mark.parametrize("server", ["poll"], indirect=True)
def test_poll_new_version_goes_live_under_load(server: str, tmp_path: Path) -> None:
    triton = httpclient.InferenceServerClient(server)
    load = LoadGenerator(server)
    try:
        _until(lambda: load.count(1) >= 20, "answers from version 1")
        publish(tmp_path, "m", _model(2))  # as bnfold fold --repository does: renamed into place when complete
        _until(lambda: load.count(2) >= 50, "answers from version 2")
        publish(tmp_path, "m", _model(3, tamper=0.5))  # a broken newer version

        def reported() -> bool:
            return any(e.get("version") == "3" for e in triton.get_model_repository_index())

        _until(reported, "version 3 to be reported")
        served = load.count(2)
        _until(lambda: load.count(2) >= served + 50, "more answers after version 3 was reported")
    finally:
        load.stop()
    assert load.failures == []
    assert {a.status for a in load.answers} == {200}
    old = [a for a in load.answers if a.version == 1]
    new = [a for a in load.answers if a.version == 2]
    assert len(old) + len(new) == len(load.answers)  # version 3 never answered
    # One switch point: no request sent after a version-2 answer arrived was answered by version 1.
    assert max(a.started for a in old) < min(a.finished for a in new)
    index = triton.get_model_repository_index()
    assert index[0] == {"name": "m", "version": "2", "state": "READY"}
    assert index[1]["version"] == "3" and index[1]["state"] == "UNAVAILABLE"
    assert index[1]["reason"].startswith("self-test output differs from the certificate")
    assert triton.is_model_ready("m") and not triton.is_model_ready("m", "3")
    with pytest.raises(InferenceServerException) as caught:
        triton.load_model("m")
    assert caught.value.status() == "403"
    assert "needs BNFOLD_MODEL_CONTROL=explicit, got BNFOLD_MODEL_CONTROL=poll" in caught.value.message()


@pytest.mark.parametrize("server", ["explicit"], indirect=True)
def test_explicit_unload_under_load_drains_and_load_restores(server: str, tmp_path: Path) -> None:
    triton = httpclient.InferenceServerClient(server)
    assert triton.get_model_repository_index() == [{"name": "m", "version": "1", "state": "READY"}]
    load = LoadGenerator(server)
    try:
        _until(lambda: load.count(1) >= 20, "answers from version 1")
        triton.unload_model("m")  # returns once the requests in flight have finished
        assert not triton.is_model_ready("m")
        assert triton.get_model_repository_index() == [{"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}]
        _until(lambda: sum(a.status == 404 for a in load.answers) >= 10, "requests refused while unloaded")
        publish(tmp_path, "m", _model(2))
        triton.load_model("m")
        assert triton.is_model_ready("m")
        _until(lambda: load.count(2) >= 20, "answers from version 2")
    finally:
        load.stop()
    assert load.failures == []
    statuses = [a.status for a in sorted(load.answers, key=lambda a: a.started)]
    assert set(statuses) == {200, 404}
    for answer in load.answers:
        assert (answer.status == 200) == (answer.version is not None)
    with pytest.raises(InferenceServerException) as caught:
        triton.load_model("absent")
    assert caught.value.status() == "404"


@pytest.mark.parametrize("server", ["poll-2"], indirect=True)
def test_poll_with_two_workers_each_worker_switches(server: str, tmp_path: Path) -> None:
    load = LoadGenerator(server, fresh_connections=True)  # a new connection per request reaches either worker
    try:
        _until(lambda: load.count(1) >= 20, "answers from version 1")
        publish(tmp_path, "m", _model(2))
        process = SERVERS[server]

        def both_switched() -> bool:  # every worker polls by itself and logs its own switch
            return log_text(process).count('"event": "model versions changed", "model": "m", "serving": [2]') == 2

        _until(both_switched, "both workers to switch to version 2")
        switched = time.monotonic_ns()
        _until(lambda: sum(a.started > switched for a in load.answers) >= 40, "answers after both switched")
    finally:
        load.stop()
    assert load.failures == []
    assert {a.status for a in load.answers} == {200}
    assert all(a.version == 2 for a in load.answers if a.started > switched)


def test_bnfold_fold_repository_goes_live_on_a_polling_server(tmp_path: Path) -> None:
    """The README's workflow: ``bnfold fold CHECKPOINT --repository DIR --name NAME`` on a running server."""
    pytest.importorskip("torch")
    from bnfold.train import TrainConfig, train

    checkpoint = tmp_path / "cnn.pt"
    train(TrainConfig(arch="cnn", epochs=1, batch_size=128, arch_config={"width": 4, "depth": 1}, device="cpu"),
          output=checkpoint)
    root = tmp_path / "models"
    fold = [sys.executable, "-m", "bnfold", "fold", str(checkpoint), "--repository", str(root), "--name", "digits",
            "--quiet"]
    subprocess.run(fold, check=True, capture_output=True, timeout=600)
    image = np.random.default_rng(0).integers(0, 17, (1, 1, 8, 8)).astype(np.float32)
    want = ModelRuntime(root / "digits" / "1" / "model.onnx", threads=1).run({"input": image})[0].ravel()

    def check(body: dict[str, Any]) -> int:  # both versions hold the same weights: the version tells them apart
        got = np.array(body["outputs"][0]["data"], dtype=np.float64)
        assert np.max(np.abs(got - want)) <= 1e-5 + 1e-4 * np.max(np.abs(want)), (got, want)
        return int(body["model_version"])

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": image.ravel().tolist()}]}
    with _serve(root, "poll") as url:
        # Two lanes with pauses: steady traffic that leaves the 2-core machine to the bnfold fold running beside it.
        load = LoadGenerator(url, lanes=2, model="digits", body=body, check=check, pause_s=0.01)
        try:
            _until(lambda: load.count(1) >= 20, "answers from version 1")
            subprocess.run(fold, check=True, capture_output=True, timeout=600)  # version 2, while serving
            _until(lambda: load.count(2) >= 50, "answers from version 2")
        finally:
            load.stop()
        index = httpclient.InferenceServerClient(url).get_model_repository_index()
        assert index == [{"name": "digits", "version": "1", "state": "READY"},
                         {"name": "digits", "version": "2", "state": "READY"}]
    assert load.failures == []
    assert {a.status for a in load.answers} == {200}
    old = [a for a in load.answers if a.version == 1]
    new = [a for a in load.answers if a.version == 2]
    assert max(a.started for a in old) < min(a.finished for a in new)
