"""The service runs without torch: importing it must not import torch, and it must work with torch absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", [
    pytest.param("service.main", id="app"),
    pytest.param("bnfold.cli.serve", id="cli-serve"),
])
def test_import_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serves_with_torch_missing(repository: Path) -> None:
    """Block ``import torch`` entirely, start the app, run one inference."""
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app
with TestClient(create_app(Settings(model_repository={str(repository)!r}))) as client:
    body = {{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}}]}}
    response = client.post("/v2/models/classifier/infer", json=body)
    assert response.status_code == 200, response.text
    assert client.get("/v2/models/classifier").json()["certificate"]["selftest"]["passed"]
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
