"""The CLI in a real 80-column terminal (a pseudo-terminal), and in a pipe: every line fits, nothing is cut.

A terminal gets spinners and a progress bar (escape sequences, carriage returns); every piece of
text between line breaks and carriage returns must fit the terminal's width, and no value may be
cut with an ellipsis ("1.33e…"). A pipe gets plain progress lines and honours ``$COLUMNS``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnfold.cli.layout import number

pytestmark = pytest.mark.slow

ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def screen_pieces(raw: str) -> list[str]:
    """What the terminal shows, as the pieces of text between line breaks and carriage returns."""
    return [piece for piece in re.split(r"\r\n|\n|\r", ESCAPES.sub("", raw)) if piece.strip()]


def assert_fits(raw: str, columns: int) -> list[str]:
    pieces = screen_pieces(raw)
    too_wide = [p for p in pieces if len(p) > columns]
    assert not too_wide, f"{len(too_wide)} lines wider than {columns} columns, e.g. {too_wide[0]!r}"
    cut = [p for p in pieces if "…" in p]
    assert not cut, f"text cut with an ellipsis: {cut[0]!r}"
    return pieces


def test_train_fold_inspect_verify_bench_fit_80_columns(run_in_terminal, tmp_path: Path) -> None:
    code, raw = run_in_terminal("train", "--epochs", "3", "--width", "4", "--depth", "1", "-o", "t.pt",
                                "--plot", "t.png", cwd=tmp_path)
    assert code == 0, raw
    pieces = assert_fits(raw, 80)
    assert any(p.startswith("epoch 3/3  loss ") for p in pieces), pieces  # one line per finished epoch
    assert any(p.startswith("saved t.pt: cnn on digits, best epoch ") for p in pieces), pieces

    code, raw = run_in_terminal("fold", "t.pt", "-o", "t.onnx", "--report", "r.json", cwd=tmp_path)
    assert code == 0, raw
    text = "\n".join(assert_fits(raw, 80))
    assert "verification: passed, 4 of 4 checks within the allowed error" in text
    report = json.loads((tmp_path / "r.json").read_text())
    for key, check in report["checks"].items():  # every deciding number in full
        assert f" {number(check['max_abs_error'])} " in text, (key, text)
        assert f" {number(check['allowed'])} " in text, (key, text)
    assert "baseline" not in text  # the float32 baselines are --verbose only, explained as "for scale"

    code, raw = run_in_terminal("fold", "t.pt", "-o", "t2.onnx", "--verbose", cwd=tmp_path)
    assert code == 0, raw
    text = "\n".join(assert_fits(raw, 80))
    assert "every comparison (baseline rows are shown for scale and decide nothing)" in text
    assert text.count("baseline") >= 9  # 2 baseline rows per check, 4 checks, plus the heading

    for args in (["inspect", "t.pt"], ["inspect", "t.onnx"], ["verify", "t.pt", "t.onnx"],
                 ["bench", "t.onnx", "--repeats", "2", "--warmup", "0", "--batch", "1"]):
        code, raw = run_in_terminal(*args, cwd=tmp_path)
        assert code == 0, (args, raw)
        assert_fits(raw, 80)
    assert "nothing was folded" in " ".join(screen_pieces(raw))  # bench of an already folded ONNX file


def test_a_pipe_gets_plain_progress_lines_and_honours_columns(trained: dict[str, Path], run_bnfold,
                                                              tmp_path: Path) -> None:
    proc = run_bnfold("fold", trained["cnn"], "-o", tmp_path / "m.onnx", env={"COLUMNS": "60"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 60, lines
    progress = proc.stderr.splitlines()
    assert progress[0].endswith(f"loading {trained['cnn']}") and progress[-1].endswith("] writing"), progress
    assert all(re.match(r"\[ *\d+\.\ds\] \w", line) for line in progress), progress
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr + proc.stdout

    quiet = run_bnfold("fold", trained["cnn"], "-o", tmp_path / "q.onnx", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
