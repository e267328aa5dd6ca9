"""Every command of this module's set has ``--help`` with examples."""

from __future__ import annotations

import pytest

from bnfold.cli import main


@pytest.mark.parametrize("command", [pytest.param(c, id=c) for c in ("fold", "inspect", "verify", "bench",
                                                                      "quickstart")])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bnfold {command}" in out
