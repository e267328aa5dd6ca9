"""The inference routes' ASGI fast path: what it shares with FastAPI's routes, and what only it does."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service import inference
from service.api import fastpath
from service.api.deps import check_api_key
from service.config import Settings
from service.main import create_app

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.mark.parametrize(("path", "operation"), [
    pytest.param("/v2/models/{name}/infer", "infer", id="infer"),
    pytest.param("/v2/models/{name}/versions/{version}/infer", "infer_version", id="infer-version"),
    pytest.param("/v1/models/{name}:predict", "predict", id="predict"),
])
def test_openapi_documents_the_inference_routes(client: TestClient, path: str, operation: str) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"][path]["post"]
    assert post["operationId"] == operation
    assert {"200", "400", "401", "404", "413", "503"} <= set(post["responses"])
    assert "/v2/models/{name}" in schema["paths"]  # FastAPI's own routes are still there
    assert {"Predictions", "Prediction"} <= set(schema["components"]["schemas"])


def test_openapi_schema_is_built_once(client: TestClient) -> None:
    app = client.app
    assert app.openapi() is app.openapi()  # type: ignore[attr-defined]


def test_trailing_slash_redirects_like_fastapi_routes(client: TestClient) -> None:
    response = client.post("/v2/models/classifier/infer/", json=BODY, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"].endswith("/v2/models/classifier/infer")


def test_head_is_405_with_allow(client: TestClient) -> None:
    response = client.head("/v1/models/classifier:predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_internal_error_is_500_with_error_body(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("bug in the handler")

    logged: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(inference, "infer_soon", broken)
    monkeypatch.setattr(fastpath, "event", lambda level, message, **fields: logged.append((message, fields)))
    response = client.post("/v2/models/classifier/infer", json=BODY)
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert logged == [("internal error", {"path": "/v2/models/classifier/infer",
                                          "error": "RuntimeError: bug in the handler"})]


@pytest.mark.parametrize("route", ["/v2/models/classifier/infer", "/v1/models/classifier:predict"])
def test_a_bug_after_the_batch_ran_is_500_and_the_budget_comes_back(client: TestClient, route: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is built in the batch's callback, after the handler returned: a bug there is a 500 too."""
    def broken(*args: Any) -> None:
        raise RuntimeError("bug in the encoder")

    monkeypatch.setattr(inference.codec, "encode_infer_response", broken)
    monkeypatch.setattr(inference, "_classify", broken)
    body = BODY if route.endswith("/infer") else {"instances": [[1, 2, 3, 4]]}
    response = client.post(route, json=body)
    assert (response.status_code, response.json()) == (500, {"error": "internal server error"})
    endpoints = client.app.endpoints  # type: ignore[attr-defined]
    assert endpoints.budget.used == 0
    assert client.app.state.service.repository.get("classifier").inflight == 0  # type: ignore[attr-defined]


def test_metrics_count_every_request_on_cached_children(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v2/models/classifier/infer", json=BODY).status_code == 200
        assert client.post("/v2/models/classifier/infer", content=b"{").status_code == 400
    text = client.get("/metrics").text
    assert 'bnfold_requests_total{model="classifier",outcome="success"} 3.0' in text
    assert 'bnfold_requests_total{model="classifier",outcome="invalid_input"} 3.0' in text
    assert 'bnfold_request_duration_seconds_count{model="classifier"} 3.0' in text
    assert 'bnfold_http_errors_total{status="400"} 3.0' in text


def test_root_path_is_stripped_before_matching(settings: Settings) -> None:
    with TestClient(create_app(settings), root_path="/api") as client:
        response = client.post("/api/v2/models/classifier/infer", json=BODY)
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == "classifier"


def test_client_gone_mid_body_gets_no_answer(repository: Path) -> None:
    app = create_app(Settings(model_repository=repository))
    sent: list[MutableMapping[str, Any]] = []
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": b'{"inputs"', "more_body": True},
                                      {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/classifier/infer", "root_path": "",
             "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert sent == []
    assert messages == []


@pytest.mark.parametrize(("key", "header", "allowed"), [
    pytest.param(None, b"", True, id="no-key-configured"),
    pytest.param("s3cret", b"Bearer s3cret", True, id="right"),
    pytest.param("s3cret", b"Bearer s3cre", False, id="prefix"),
    pytest.param("s3cret", b"s3cret", False, id="no-bearer"),
    pytest.param("s3cret", b"", False, id="missing"),
])
def test_check_api_key(tmp_path: Path, key: str | None, header: bytes, allowed: bool) -> None:
    settings = Settings(model_repository=tmp_path, api_key=SecretStr(key) if key else None)
    if allowed:
        check_api_key(settings, header)
        return
    with pytest.raises(HTTPException) as raised:
        check_api_key(settings, header)
    assert raised.value.status_code == 401
    assert raised.value.headers == {"WWW-Authenticate": "Bearer"}


class _Transport(asyncio.Transport):
    """Records each write and whether the connection was closed (and what was written before)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed_after: int | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        assert self.closed_after is None, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed_after is not None

    def close(self) -> None:
        if self.closed_after is None:
            self.closed_after = len(self.writes)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize(("request_head", "closed"), [
    pytest.param(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", False, id="keep-alive"),
    pytest.param(b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", True,
                 id="connection-close"),
])
def test_response_head_and_body_leave_in_one_write(request_head: bytes, closed: bool) -> None:
    """The protocol joins uvicorn's head and body writes; a connection it closes is closed after that write."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.protocol import HttpLimits, LimitedHttpToolsProtocol

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    async def scenario() -> _Transport:
        config = Config(app=app, access_log=False, log_level="warning", lifespan="off")
        config.load()
        protocol = LimitedHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop(),
                                            limits=HttpLimits(16384, 30.0, 30.0))
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(request_head)
        for _ in range(1000):
            if protocol.cycle is not None and protocol.cycle.response_complete:
                break
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(scenario())
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and transport.writes[0].endswith(b"\r\n\r\nhello")
    assert (transport.closed_after == 1) if closed else transport.closed_after in (None, 1)


def test_direct_routes_are_remembered_per_path_and_bounded(settings: Settings) -> None:
    app = create_app(settings)
    endpoints = app.endpoints
    assert endpoints is not None
    paths = ["/v2/models/classifier/infer", "/v2/models/a/versions/3/infer", "/v1/models/b:predict",
             "/v2/models/classifier/info", "/v2/models/x/y/infer", "/v2/models//infer"]
    for _ in range(2):  # computed, then remembered: the same answers
        for path in paths:
            route = app.direct_route(path)
            params = fastpath.match_inference(path)
            assert (route is None) == (params is None)
            if route is not None:
                assert route[0] == endpoints.serve and route[1] == params
    for i in range(fastpath.ROUTES_KEPT * 2 + 1):  # a client naming ever new models
        assert app.direct_route(f"/v2/models/m{i}/infer") is not None
        assert len(endpoints.direct_routes) <= fastpath.ROUTES_KEPT
    endpoints.direct_routes.clear()
    long = "/v2/models/" + "m" * fastpath.ROUTE_BYTES_KEPT + "/infer"
    assert app.direct_route(long) is not None and endpoints.direct_routes == {}  # not kept
