"""Shared CLI test fixtures: run ``bnfold`` as a subprocess, and tiny trained checkpoints.

Kept small on purpose: each test module builds whatever else it needs inline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Tiny versions of every architecture: 1 epoch, small widths. Enough for real (trained) batch-norm
# statistics, cheap enough for CI.
TINY: dict[str, dict[str, int]] = {
    "cnn": {"width": 4, "depth": 1},
    "mlp": {"width": 8, "depth": 2},
    "resnet": {"width": 4, "depth": 2},
    "mobilenet": {"width": 4, "depth": 1},
    "conv1d": {"width": 4, "depth": 2},
}

RunBnfold = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def run_bnfold() -> RunBnfold:
    """``run_bnfold(*args, cwd=None)``: ``python -m bnfold ARGS`` with captured text output."""

    def run(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
        return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout, check=False)

    return run


class Checkpoints(dict[str, Path]):
    """Trained tiny checkpoints by architecture name, each trained on first use and then reused."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        from bnfold.train import TrainConfig, train

        path = self.root / f"{arch}.pt"
        train(TrainConfig(arch=arch, epochs=1, batch_size=128, arch_config=TINY[arch], device="cpu"), output=path)
        self[arch] = path
        return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """``trained[arch]``: a bnfold checkpoint of ``arch`` trained for one epoch (session-scoped)."""
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))
