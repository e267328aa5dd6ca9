"""Every command has ``--help`` with examples, and each option's help names its default at most once."""

from __future__ import annotations

import argparse
import re

import pytest

from bnfold.cli import COMMANDS, HelpFormatter, build_parser, main


@pytest.mark.parametrize("command", [pytest.param(c, id=c) for c in ("fold", "inspect", "verify", "bench",
                                                                      "quickstart")])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bnfold {command}" in out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [pytest.param(c, id=c) for c in COMMANDS])
def test_each_option_shows_one_default_and_required_ones_none(command: str) -> None:
    parser = _subparsers()[command]
    formatter = HelpFormatter(prog="bnfold")
    for action in parser._actions:
        text = formatter._get_help_string(action) % {"default": action.default, "prog": "bnfold"} \
            if action.help else ""
        assert text.count("(default") <= 1, (command, action.option_strings, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (action.option_strings, text)
        if action.required:
            assert "(default" not in text, (action.option_strings, text)
    if command == "fold":
        texts = {a.dest: formatter._get_help_string(a) for a in parser._actions}
        assert texts["atol"].endswith("(default: %(default)s)")  # a real default is still shown


@pytest.mark.parametrize("command", [pytest.param(c, id=c) for c in COMMANDS])
def test_help_output_of_the_real_command(command: str, run_bnfold) -> None:
    proc = run_bnfold(command, "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if len(line) > 80] == []
    flat = " ".join(proc.stdout.split())
    assert "(default: None)" not in flat
    assert not re.search(r"\(default: [^)]*\) \(default:", flat), flat
    if command == "train":
        assert "CSV label column (default: label) -" in flat or flat.count("CSV label column (default: label)") == 1
        assert "checkpoint file to write (.pt) --arch" in flat  # -o is required: no default after it
