"""``python -m service`` takes its configuration from the environment and no arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
