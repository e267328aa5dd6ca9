"""``python -m service`` takes its configuration from the environment and no arguments."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app


@pytest.mark.parametrize(
    ("args", "code", "stream"),
    [
        pytest.param(["--help"], 0, "stdout", id="help"),
        pytest.param(["-h"], 0, "stdout", id="short-help"),
        pytest.param(["--port", "9000"], 2, "stderr", id="unexpected-argument"),
    ],
)
def test_arguments_print_usage_instead_of_serving(args: list[str], code: int, stream: str) -> None:
    done = subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    text = getattr(done, stream)
    assert text.startswith("usage: python -m service") and "BNFOLD_" in text


@pytest.mark.parametrize("freeze", [True, False])
def test_a_serving_app_freezes_its_startup_objects_for_the_gc(repository: Path, freeze: bool) -> None:
    """Start-up objects leave the cyclic GC's scans only in a serving process's app (not in others, e.g. tests)."""
    gc.unfreeze()
    try:
        with TestClient(create_app(Settings(model_repository=repository), freeze_gc=freeze)) as client:
            assert client.get("/v2/health/live").status_code == 200
            frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert (frozen > 10_000) if freeze else frozen == 0


def test_the_apps_that_serve_freeze(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run()`` with one worker serves a freezing app; worker processes serve the module-level one, which freezes."""
    import uvicorn

    import service.main as main

    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    main.run(Settings(model_repository=repository, workers=1))
    assert len(served) == 1 and served[0].state.freeze_gc is True
    assert main.app.state.freeze_gc is True
