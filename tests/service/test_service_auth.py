"""The optional API key: inference and metadata need it, health does not, and it is never echoed or logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

KEY = "s3cret-k3y-do-not-leak"
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
PROTECTED = [
    pytest.param("get", "/v2", id="server-metadata"),
    pytest.param("get", "/v2/models/classifier", id="model-metadata"),
    pytest.param("get", "/v2/models/classifier/versions/1", id="version-metadata"),
    pytest.param("get", "/v2/models/classifier/ready", id="model-ready"),
    pytest.param("post", "/v2/models/classifier/infer", id="infer"),
    pytest.param("post", "/v2/models/classifier/versions/1/infer", id="infer-version"),
    pytest.param("post", "/v1/models/classifier:predict", id="predict"),
    pytest.param("get", "/metrics", id="metrics"),
]


@pytest.fixture
def keyed(repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_repository=repository, api_key=KEY, intra_op_threads=1))) as client:
        yield client


def _call(client: TestClient, method: str, path: str, headers: dict[str, Any]) -> Any:
    if method == "get":
        return client.get(path, headers=headers)
    body = {"instances": [[1, 2, 3, 4]]} if path.startswith("/v1") else BODY
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("headers", [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
    pytest.param({"Authorization": KEY}, id="no-bearer-prefix"),
    pytest.param({"Authorization": f"Bearer {KEY}x"}, id="longer"),
    pytest.param({"Authorization": "Bearer ü".encode("latin-1")}, id="non-latin1"),
])
def test_401_without_the_key(keyed: TestClient, method: str, path: str, headers: dict[str, Any]) -> None:
    response = _call(keyed, method, path, headers)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
    assert response.headers["WWW-Authenticate"] == "Bearer"
    text = keyed.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'bnfold_http_errors_total{status="401"} 1.0' in text


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_200_with_the_key(keyed: TestClient, method: str, path: str) -> None:
    response = _call(keyed, method, path, {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert KEY not in response.text


@pytest.mark.parametrize("path", [pytest.param("/v2/health/live", id="live"),
                                  pytest.param("/v2/health/ready", id="ready")])
def test_health_stays_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_key_never_logged_or_echoed(repository: Path, capfd: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model_repository=repository, api_key=KEY, intra_op_threads=1, log_level="debug",
                        access_log=True)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    with TestClient(create_app(settings)) as client:
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {KEY}-wrong"}):
            for method, path in (("get", "/v2"), ("post", "/v2/models/classifier/infer"),
                                 ("post", "/v2/models/nope/infer")):
                response = _call(client, method, path, headers)
                assert KEY not in response.text
                assert not any(KEY in v for v in response.headers.values())
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
