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


def bnfold_command() -> list[str]:
    """The ``bnfold`` console script beside this Python (what a user runs: the current directory is
    not on its module path, unlike ``python -m bnfold``), else ``python -m bnfold``."""
    script = Path(sys.executable).with_name("bnfold")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bnfold"]


@pytest.fixture(scope="session")
def bnfold_argv() -> list[str]:
    """:func:`bnfold_command`, for tests that drive the process themselves (signals, pipes)."""
    return bnfold_command()


@pytest.fixture(scope="session")
def run_bnfold() -> RunBnfold:
    """``run_bnfold(*args, cwd=None, env=None)``: the ``bnfold`` command with captured text output.

    Output goes to pipes (not a terminal); ``COLUMNS=200`` unless ``env`` says otherwise.
    """

    def run(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
            timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore", **(env or {})}
        return subprocess.run([*bnfold_command(), *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=full_env, timeout=timeout, check=False)

    return run


RunInTerminal = Callable[..., tuple[int, str]]


@pytest.fixture(scope="session")
def run_in_terminal() -> RunInTerminal:
    """``run_in_terminal(*args, columns=80, cwd=None)``: ``bnfold ARGS`` in a pseudo-terminal of
    ``columns`` x 40 (stdin, stdout and stderr all the terminal, ``$COLUMNS`` unset, as in a user's
    shell); returns the exit code and everything the terminal received, escape sequences included."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    def run(*args: str | os.PathLike[str], columns: int = 80, cwd: str | os.PathLike[str] | None = None,
            timeout: float = 300) -> tuple[int, str]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
        env.update(TERM="xterm-256color", PYTHONWARNINGS="ignore")
        proc = subprocess.Popen([*bnfold_command(), *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                                cwd=cwd, env=env, start_new_session=True)
        os.close(slave)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"bnfold {args} did not finish in {timeout} s")
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the child closed the terminal
                        data = b""
                    if not data:
                        break
                    chunks.append(data)
                elif proc.poll() is not None:
                    break
        finally:
            os.close(master)
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")

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
