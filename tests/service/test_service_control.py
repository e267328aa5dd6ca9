"""Model control in-process: version policy, settling, index/load/unload over HTTP, poll mode, draining.

Each test runs the app's lifespan on its own event loop (``asyncio.run``) and talks to it through
httpx's ASGI transport, so concurrent requests, polls and unloads interleave on one loop as they do
in a server. Waits are polled up to generous deadlines; nothing depends on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from service_models import certified, gemm_model, gemm_reference

from bnfold.repository import publish
from service import polling
from service.api.routes.repository import MAX_CONTROL_BODY_BYTES
from service.config import Settings
from service.control import ModelControl
from service.main import create_app, lifespan
from service.policy import MAX_POLICY_VERSIONS, VersionPolicy
from service.polling import Settled, Signature
from service.repository import ModelConfig, ModelRepository

DEADLINE_S = 60.0  # for a poll to notice a change on a loaded 2-core machine; an idle one takes < 1 s
KEY = "control-k3y"
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def _model(seed: int, tamper: float = 0.0) -> bytes:
    """A certified Gemm whose outputs tell its seed apart; ``tamper`` makes its self-test fail."""
    return certified(gemm_model(seed), seed, tamper=tamper).SerializeToString()


def _write(root: Path, name: str, version: int, data: bytes, config: dict[str, Any] | None = None) -> None:
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if config is not None:
        (root / name / "config.json").write_text(json.dumps(config))


@contextlib.asynccontextmanager
async def serving(root: Path, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(Settings(model_repository=root, intra_op_threads=1, **settings))
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                                timeout=DEADLINE_S) as client:
        yield client, app


def _control(app: FastAPI) -> ModelControl:
    return app.state.service.control  # type: ignore[no-any-return]


async def _infer(client: httpx.AsyncClient, name: str = "m", version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{name}/infer" if version is None else f"/v2/models/{name}/versions/{version}/infer"
    return await client.post(path, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                                     "data": X.ravel().tolist()}]})


def _check_answer(body: dict[str, Any]) -> int:
    """The version that answered; its logits must be that version's (float64 reference, float32 tolerance)."""
    version = int(body["model_version"])
    got = np.array(body["outputs"][0]["data"], dtype=np.float64)
    want = gemm_reference(version, X).ravel()
    assert np.max(np.abs(got - want)) <= 1e-5 + 1e-4 * np.max(np.abs(want)), (version, got, want)
    return version


async def _until(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (a predicate, or a coroutine function) until it holds, failing after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE_S:.0f} s"
        await asyncio.sleep(0.02)


async def _index(client: httpx.AsyncClient, **body: Any) -> list[dict[str, str]]:
    response = await client.post("/v2/repository/index", json=body or None)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# -- version policy and settling ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "policy"), [
    pytest.param({"all": {}}, VersionPolicy(), id="all"),
    pytest.param({"latest": {"num_versions": 2}}, VersionPolicy("latest", num_versions=2), id="latest"),
    pytest.param({"specific": {"versions": [3, 1, 3]}}, VersionPolicy("specific", versions=(1, 3)), id="specific"),
])
def test_version_policy_parses_triton_shapes(value: Any, policy: VersionPolicy) -> None:
    assert VersionPolicy.parse(value) == policy


@pytest.mark.parametrize(("value", "message"), [
    pytest.param({"latest": {"num_versions": 0}}, "num_versions must be an integer from 1 to 64, got 0", id="zero"),
    pytest.param({"latest": {"num_versions": MAX_POLICY_VERSIONS + 1}}, "got 65", id="too-many"),
    pytest.param({"latest": {"num_versions": True}}, "got True", id="bool"),
    pytest.param({"specific": {"versions": []}}, "list of 1 to 64 version numbers", id="empty-list"),
    pytest.param({"specific": {"versions": [1, -2]}}, "got [1, -2]", id="negative"),
    pytest.param({"specific": {"versions": list(range(65))}}, "list of 1 to 64", id="long-list"),
    pytest.param({"newest": {}}, 'expected {"all": {}}', id="unknown-kind"),
    pytest.param({"all": {}, "latest": {"num_versions": 1}}, "an object with one key", id="two-kinds"),
    pytest.param("latest", "an object with one key", id="not-an-object"),
])
def test_version_policy_refuses_with_a_reason(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        VersionPolicy.parse(value)
    assert message in str(caught.value)


def test_version_policy_in_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    assert ModelConfig.load(tmp_path / "config.json").version_policy == VersionPolicy("latest", num_versions=1)
    (tmp_path / "config.json").write_text(json.dumps({"version_policy": {"latest": {}}}))
    with pytest.raises(ValueError, match=r"^config\.json: version_policy: expected"):
        ModelConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize(("policy", "present", "candidates"), [
    pytest.param(VersionPolicy(), [1, 3, 2], [3, 2, 1], id="all-newest-first"),
    pytest.param(VersionPolicy("latest", num_versions=1), [1, 3, 2], [3, 2, 1], id="latest-walks-all"),
    pytest.param(VersionPolicy("specific", versions=(1, 4)), [1, 2, 3], [1], id="specific-present-only"),
])
def test_policy_candidates(policy: VersionPolicy, present: list[int], candidates: list[int]) -> None:
    assert policy.candidates(present) == candidates


def test_a_version_settles_after_two_equal_scans() -> None:
    settled = Settled()
    first, second = Signature((10, 1, 7, 1), None), Signature((20, 2, 7, 1), None)
    assert settled.update({"m": {1: first}}) == {}
    assert settled.update({"m": {1: second}}) == {}  # still growing
    assert settled.update({"m": {1: second}}) == {"m": {1: second}}
    assert settled.update({}) == {}  # removed: forgotten
    assert settled.update({"m": {1: second}}) == {}


def test_explicit_mode_refuses_several_workers() -> None:
    with pytest.raises(ValidationError, match="BNFOLD_MODEL_CONTROL=explicit needs BNFOLD_WORKERS=1, got "
                                              "BNFOLD_WORKERS=2"):
        Settings(model_control="explicit", workers=2)
    assert Settings(model_control="poll", workers=2).workers == 2


# -- the HTTP routes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_refused_unless_explicit(tmp_path: Path, mode: str) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control=mode, repository_poll_s=3600) as (client, _):
            for action in ("load", "unload"):
                response = await client.post(f"/v2/repository/models/m/{action}")
                assert response.status_code == 403
                assert response.json()["error"].startswith(f"model {action} needs BNFOLD_MODEL_CONTROL=explicit, "
                                                           f"got BNFOLD_MODEL_CONTROL={mode}")
            assert await _index(client) == [{"name": "m", "version": "1", "state": "READY"}]
            assert (await _infer(client)).status_code == 200

    asyncio.run(run())


def test_repository_routes_need_the_api_key(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control="explicit", api_key=KEY) as (client, _):
            for path in ("/v2/repository/index", "/v2/repository/models/m/load", "/v2/repository/models/m/unload"):
                response = await client.post(path)
                assert response.status_code == 401 and KEY not in response.text
                assert "missing or wrong API key" in response.json()["error"]
            response = await client.post("/v2/repository/models/m/unload", headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code == 200

    asyncio.run(run())


def test_explicit_index_unload_load(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))
    _write(tmp_path, "m", 2, _model(2))
    _write(tmp_path, "broken", 1, _model(3, tamper=0.5))

    async def run() -> None:
        async with serving(tmp_path, model_control="explicit") as (client, _):
            index = await _index(client)
            assert index[0]["name"] == "broken" and index[0]["state"] == "UNAVAILABLE"
            assert index[0]["reason"].startswith("self-test output differs from the certificate")
            assert index[1:] == [{"name": "m", "version": "1", "state": "READY"},
                                 {"name": "m", "version": "2", "state": "READY"}]
            assert [e["name"] for e in await _index(client, ready=True)] == ["m", "m"]

            assert (await client.post("/v2/repository/models/m/unload",
                                      json={"parameters": {"unload_dependents": False}})).status_code == 200
            response = await _infer(client)
            assert response.status_code == 404 and response.json() == {"error": "unknown model 'm'"}
            assert [e for e in await _index(client) if e["name"] == "m"] == \
                [{"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}]

            publish(tmp_path, "m", _model(3))  # version 3 appears while unloaded; load picks it up
            assert (await client.post("/v2/repository/models/m/load")).status_code == 200
            assert _check_answer((await _infer(client)).json()) == 3
            assert [e["version"] for e in await _index(client, ready=True)] == ["1", "2", "3"]

            response = await client.post("/v2/repository/models/broken/load")
            assert response.status_code == 400
            assert response.json()["error"].startswith("model 'broken': version 1 did not load: self-test output "
                                                       "differs from the certificate")
            assert str(tmp_path) not in response.text
            response = await client.post("/v2/repository/models/nothing/load")
            assert response.status_code == 404 and "'nothing' is not in the model repository" in response.text
            response = await client.post("/v2/repository/models/nothing/unload")
            assert response.status_code == 404 and response.json() == {"error": "unknown model 'nothing'"}
            for path in ("/v2/repository/models/..%2F..%2Fetc/load", "/v2/repository/models/.staging-x/load"):
                assert (await client.post(path)).status_code == 404

    asyncio.run(run())


@pytest.mark.parametrize(("path", "body", "message"), [
    pytest.param("index", b"[1]", "expected a JSON object, got list", id="index-list"),
    pytest.param("index", b'{"ready": "yes"}', "'ready' must be bool, got str", id="index-ready-type"),
    pytest.param("index", b"{", "the request body is not JSON", id="index-not-json"),
    pytest.param("models/m/load", b'{"parameters": {"config": "{}"}}', "parameter 'config' is not supported",
                 id="load-config-override"),
    pytest.param("models/m/load", b'{"model": 1}', "unknown key 'model'; expected ['parameters']", id="load-key"),
    pytest.param("models/m/unload", b'{"parameters": {"unload_dependents": 1}}',
                 "parameter 'unload_dependents' must be bool, got int", id="unload-type"),
    pytest.param("index", b" " * (MAX_CONTROL_BODY_BYTES + 1), "413", id="index-too-large"),
])
def test_malformed_control_bodies_are_4xx(tmp_path: Path, path: str, body: bytes, message: str) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control="explicit") as (client, _):
            response = await client.post(f"/v2/repository/{path}", content=body)
            if message == "413":
                assert response.status_code == 413 and str(MAX_CONTROL_BODY_BYTES) in response.json()["error"]
            else:
                assert response.status_code == 400 and message in response.json()["error"]
            assert (await _infer(client)).status_code == 200

    asyncio.run(run())


# -- startup, policy, default version -------------------------------------------------------------------


def test_latest_policy_at_startup_and_newest_ready_default(tmp_path: Path) -> None:
    policy = {"version_policy": {"latest": {"num_versions": 2}}}
    for version in (1, 2, 3):
        _write(tmp_path, "m", version, _model(version))
    _write(tmp_path, "m", 4, _model(4, tamper=0.5), config=policy)  # the newest fails: it does not count

    async def run() -> None:
        async with serving(tmp_path) as (client, _):
            assert [(e["version"], e["state"]) for e in await _index(client)] == \
                [("2", "READY"), ("3", "READY"), ("4", "UNAVAILABLE")]
            assert _check_answer((await _infer(client)).json()) == 3
            assert (await _infer(client, version="1")).status_code == 404
            metadata = (await client.get("/v2/models/m")).json()
            assert metadata["version"] == "3" and metadata["ready"] and metadata["versions"] == ["2", "3", "4"]

    asyncio.run(run())


def test_specific_policy(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        _write(tmp_path, "m", version, _model(version))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1, 3, 9]}}}))

    async def run() -> None:
        async with serving(tmp_path) as (client, _):
            assert [e["version"] for e in await _index(client)] == ["1", "3"]

    asyncio.run(run())


# -- poll mode ------------------------------------------------------------------------------------------


@dataclass
class Answer:
    started: int  # order in which requests were sent and answers received, on the one event loop
    finished: int
    version: int


def test_poll_new_version_under_load_switches_once_without_failures(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1), config={"version_policy": {"latest": {"num_versions": 1}}})

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=0.05) as (client, app):
            clock = iter(range(10**9))
            answers: list[Answer] = []
            failures: list[str] = []
            stop = asyncio.Event()

            async def load(lane: int) -> None:
                while not stop.is_set():
                    started = next(clock)
                    response = await _infer(client)
                    finished = next(clock)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    answers.append(Answer(started, finished, _check_answer(response.json())))

            lanes = [asyncio.create_task(load(k)) for k in range(8)]
            await _until(lambda: len(answers) >= 20, "first answers")
            publish(tmp_path, "m", _model(2))  # what bnfold fold --repository does: version 2, renamed into place
            await _until(lambda: sum(a.version == 2 for a in answers) >= 50, "answers from version 2")
            await _until(lambda: not app.state.service.repository.retiring, "version 1 to be freed")
            stop.set()
            await asyncio.gather(*lanes)
            assert failures == []
            old = [a for a in answers if a.version == 1]
            new = [a for a in answers if a.version == 2]
            assert old and new and len(old) + len(new) == len(answers)
            # One switch point: no request sent after any version-2 answer arrived was answered by version 1.
            assert max(a.started for a in old) < min(a.finished for a in new)
            assert await _index(client) == [{"name": "m", "version": "2", "state": "READY"}]
            metrics = (await client.get("/metrics")).text
            assert 'bnfold_model_ready{model="m",version="1"} 0.0' in metrics
            assert 'bnfold_model_ready{model="m",version="2"} 1.0' in metrics

    asyncio.run(run())


def test_poll_broken_new_version_keeps_the_old_one_serving(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1), config={"version_policy": {"latest": {"num_versions": 1}}})

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=0.05) as (client, _):
            publish(tmp_path, "m", _model(2, tamper=0.5))

            async def reported() -> bool:
                return any(e.get("version") == "2" for e in await _index(client))

            await _until(reported, "the broken version to be reported")
            index = await _index(client)
            assert index[0] == {"name": "m", "version": "1", "state": "READY"}
            assert index[1]["version"] == "2" and index[1]["state"] == "UNAVAILABLE"
            assert index[1]["reason"].startswith("self-test output differs from the certificate: max abs error 0.5")
            assert _check_answer((await _infer(client)).json()) == 1
            metadata = (await client.get("/v2/models/m/versions/2")).json()
            assert not metadata["ready"] and metadata["reason"] == index[1]["reason"]
            ready = await client.get("/v2/models/m/versions/2/ready")
            assert ready.status_code == 503 and index[1]["reason"] in ready.json()["error"]
            assert (await client.get("/v2/models/m/ready")).json() == {"name": "m", "version": "1", "ready": True,
                                                                        "reason": None}
            assert (await _infer(client, version="2")).status_code == 503

    asyncio.run(run())


def test_poll_waits_for_a_file_to_stop_changing(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))
    data = _model(2)
    thirds = [data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3], data[2 * len(data) // 3:]]

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            target = tmp_path / "m" / "2" / "model.onnx"
            target.parent.mkdir()
            for part in thirds:  # a slow copy: the file grows between scans
                with target.open("ab") as file:
                    file.write(part)
                await control.poll()
                assert [e["version"] for e in await _index(client)] == ["1"]  # never tried while it changed
            await control.poll()  # unchanged across two scans: loaded
            assert await _index(client) == [{"name": "m", "version": "1", "state": "READY"},
                                            {"name": "m", "version": "2", "state": "READY"}]
            assert _check_answer((await _infer(client)).json()) == 2

    asyncio.run(run())


def test_poll_retries_a_stalled_copy_once_it_changes(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))
    data = _model(2)

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            target = tmp_path / "m" / "2" / "model.onnx"
            target.parent.mkdir()
            target.write_bytes(data[: len(data) // 2])  # the copy stalls for longer than a poll interval
            await control.poll()
            await control.poll()
            index = await _index(client)
            assert index[1]["version"] == "2" and index[1]["state"] == "UNAVAILABLE"
            assert "failed to load: InvalidProtobuf" in index[1]["reason"] and str(tmp_path) not in index[1]["reason"]
            assert _check_answer((await _infer(client)).json()) == 1  # the previous version serves
            with target.open("ab") as file:
                file.write(data[len(data) // 2:])
            await control.poll()
            await control.poll()
            assert [e["state"] for e in await _index(client)] == ["READY", "READY"]
            assert _check_answer((await _infer(client)).json()) == 2

    asyncio.run(run())


def test_poll_removed_versions_and_models_are_unloaded(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))
    _write(tmp_path, "m", 2, _model(2))
    _write(tmp_path, "other", 1, _model(3))

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            (tmp_path / "m" / "2" / "model.onnx").rename(tmp_path / "m2.onnx")
            (tmp_path / "m" / "2").rmdir()
            (tmp_path / "other" / "1" / "model.onnx").unlink()
            (tmp_path / "other" / "1").rmdir()
            (tmp_path / "other").rmdir()
            await control.poll()
            assert await _index(client) == [{"name": "m", "version": "1", "state": "READY"}]
            assert _check_answer((await _infer(client)).json()) == 1
            assert (await _infer(client, name="other")).status_code == 404

    asyncio.run(run())


def test_a_changed_version_that_fails_keeps_its_previous_files_serving(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"not an onnx model")
            for _ in range(3):  # settles on the second scan; the third must not try the same bad file again
                await control.poll()
            (entry,) = await _index(client)
            assert entry["state"] == "READY" and entry["version"] == "1"
            assert "the new files do not serve (failed to load: InvalidProtobuf" in entry["reason"]
            assert "the previous files keep serving" in entry["reason"]
            assert _check_answer((await _infer(client)).json()) == 1
            (tmp_path / "m" / "1" / "model.onnx").write_bytes(_model(1))
            await control.poll()
            await control.poll()
            assert await _index(client) == [{"name": "m", "version": "1", "state": "READY"}]

    asyncio.run(run())


# -- draining -------------------------------------------------------------------------------------------


def test_unload_drains_in_flight_requests(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control="explicit") as (client, app):
            entry = app.state.service.repository.get("m")
            gate = threading.Event()
            batcher = entry.batcher
            batcher.inline_s = 0.0  # every batch goes to the worker thread, which the gate holds (not the loop)
            run_model = batcher._run

            def held(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                gate.wait(DEADLINE_S)  # requests stay in flight until the test opens the gate
                return run_model(feeds)

            batcher._run = held
            requests = [asyncio.create_task(_infer(client)) for _ in range(16)]
            await _until(lambda: entry.inflight == 16, "16 requests in flight")
            unload = asyncio.create_task(client.post("/v2/repository/models/m/unload"))
            await _until(lambda: "m" not in app.state.service.repository.models, "unload to begin")
            assert (await _infer(client)).status_code == 404  # new requests no longer reach the version
            assert await _index(client) == [{"name": "m", "version": "1", "state": "UNLOADING", "reason": "unloading"}]
            await asyncio.sleep(0.2)
            assert not unload.done() and entry.runtime is not None  # still draining: nothing freed
            gate.set()
            responses = await asyncio.gather(*requests)
            assert [r.status_code for r in responses] == [200] * 16
            assert all(_check_answer(r.json()) == 1 for r in responses)
            assert (await unload).status_code == 200
            assert entry.runtime is None and entry.batcher is None and entry.inflight == 0

    asyncio.run(run())


def test_poll_keeps_serving_what_it_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    _write(root, "m", 1, _model(1))
    _write(root, "other", 1, _model(2))

    async def run() -> None:
        async with serving(root, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            scan_model = polling.scan_model

            def unreadable(model_dir: Path) -> dict[int, Signature]:
                if model_dir.name == "m":
                    raise PermissionError(13, "Permission denied", str(model_dir))
                return scan_model(model_dir)

            monkeypatch.setattr(polling, "scan_model", unreadable)
            await control.poll()  # m cannot be read: not the same as removed
            assert [e["name"] for e in await _index(client, ready=True)] == ["m", "other"]
            monkeypatch.undo()
            root.rename(tmp_path / "unmounted")  # the whole repository goes away (an unmounted volume)
            await control.poll()
            assert _check_answer((await _infer(client)).json()) == 1
            assert (await _infer(client, name="other")).status_code == 200

    asyncio.run(run())


def test_index_shows_a_model_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "m", 1, _model(1))

    async def run() -> None:
        async with serving(tmp_path, model_control="explicit") as (client, _):
            assert (await client.post("/v2/repository/models/m/unload")).status_code == 200
            gate = threading.Event()
            build = ModelRepository._build

            def held(self: ModelRepository, *args: Any) -> Any:
                gate.wait(DEADLINE_S)  # the load stays in progress until the test opens the gate
                return build(self, *args)

            monkeypatch.setattr(ModelRepository, "_build", held)
            load = asyncio.create_task(client.post("/v2/repository/models/m/load"))

            async def loading() -> bool:
                return await _index(client) == [{"name": "m", "state": "LOADING", "reason": "loading"}]

            await _until(loading, "the index to show the model loading")
            gate.set()
            assert (await load).status_code == 200
            assert await _index(client) == [{"name": "m", "version": "1", "state": "READY"}]

    asyncio.run(run())


def test_poll_follows_config_json(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1, _model(1))
    _write(tmp_path, "m", 2, _model(2), config={"version_policy": {"latest": {"num_versions": 1}}})

    async def run() -> None:
        async with serving(tmp_path, model_control="poll", repository_poll_s=3600) as (client, app):
            control = _control(app)
            assert [e["version"] for e in await _index(client)] == ["2"]
            (tmp_path / "m" / "config.json").write_text(json.dumps({"version_policy": {"all": {}}}))
            await control.poll()
            await control.poll()  # settled: every version reloads under the new config
            assert [(e["version"], e["state"]) for e in await _index(client)] == [("1", "READY"), ("2", "READY")]
            (tmp_path / "m" / "config.json").write_text(json.dumps({"max_batch_size": 0}))
            await control.poll()
            await control.poll()
            index = await _index(client)
            assert [(e["version"], e["state"]) for e in index] == [("1", "READY"), ("2", "READY")]
            assert all("max_batch_size must be a positive integer, got 0" in e["reason"] and
                       "the previous files keep serving" in e["reason"] for e in index)
            assert _check_answer((await _infer(client)).json()) == 2

    asyncio.run(run())
