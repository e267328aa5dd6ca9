"""``bnfold serve`` passes its flags (and only the flags given) to the service's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnfold.cli import main
from service import main as service_main
from service.config import Settings


@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(["--model-repository", "repo"], {"model_repository": Path("repo"), "port": 9100, "workers": 1},
                 id="env-fills-the-rest"),
    pytest.param(["--model-repository", "r", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"],
                 {"model_repository": Path("r"), "host": "0.0.0.0", "port": 8080, "workers": 2}, id="all-flags"),
])
def test_serve_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str],
                     expected: dict[str, object]) -> None:
    monkeypatch.chdir(tmp_path)
    for repo in ("repo", "r"):  # bnfold serve refuses a repository without a model before it starts
        (tmp_path / repo / "m" / "1").mkdir(parents=True)
        (tmp_path / repo / "m" / "1" / "model.onnx").write_bytes(b"")
    seen: list[Settings] = []
    monkeypatch.setattr(service_main, "run", seen.append)
    monkeypatch.setenv("BNFOLD_PORT", "9100")
    assert main(["serve", *argv]) == 0
    (settings,) = seen
    for key, value in expected.items():
        assert getattr(settings, key) == value


def test_serve_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "examples:\n  bnfold serve --model-repository models" in capsys.readouterr().out
