"""``bnfold serve --grpc-port``: the flag reaches the settings; without the grpc extra it is refused up front."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bnfold.cli import main
from service import main as service_main
from service.config import Settings


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "1" / "model.onnx").write_bytes(b"")
    return tmp_path / "repo"


@pytest.mark.parametrize(("argv", "env", "expected"), [
    pytest.param(["--grpc-port", "8001"], {}, 8001, id="flag"),
    pytest.param([], {"BNFOLD_GRPC_PORT": "9001"}, 9001, id="env"),
    pytest.param([], {}, None, id="off-by-default"),
])
def test_grpc_port_flag(monkeypatch: pytest.MonkeyPatch, repo: Path, argv: list[str], env: dict[str, str],
                        expected: int | None) -> None:
    pytest.importorskip("tritonclient.grpc")
    monkeypatch.delenv("BNFOLD_GRPC_PORT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen: list[Settings] = []
    monkeypatch.setattr(service_main, "run", seen.append)
    assert main(["serve", "--model-repository", str(repo), *argv]) == 0
    (settings,) = seen
    assert settings.grpc_port == expected


def test_grpc_port_without_the_extra(monkeypatch: pytest.MonkeyPatch, repo: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now raises ImportError
    seen: list[Settings] = []
    monkeypatch.setattr(service_main, "run", seen.append)
    assert main(["serve", "--model-repository", str(repo), "--grpc-port", "8001"]) == 2
    assert seen == []
    err = capsys.readouterr().err
    assert "needs gRPC support" in err and "pip install 'bnfold[grpc]'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_grpc_port_is_bounded(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model-repository", str(repo), "--grpc-port", "70000"]) == 2
    assert "grpc_port" in capsys.readouterr().err.lower()
