"""``bnfold train`` as a user runs it: a subprocess, its exit code, stdout/stderr and files."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bnfold.checkpoint import load_model
from bnfold.cli import main
from bnfold.cli.train import ARCH_NAMES, DATASET_NAMES

RunBnfold = Callable[..., subprocess.CompletedProcess[str]]  # the run_bnfold fixture (tests/cli/conftest.py)


def test_train_writes_a_loadable_checkpoint_and_plot(tmp_path: Path, run_bnfold: RunBnfold) -> None:
    proc = run_bnfold("train", "--epochs", "1", "--width", "4", "--depth", "1", "--plot", "c.png", "-o", "x.pt",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("saved x.pt: cnn on digits, best epoch 1 of 1 (val accuracy ")
    assert proc.stderr.startswith("epoch 1/1  loss ")  # one plain progress line per epoch in a pipe
    loaded = load_model(tmp_path / "x.pt")
    assert loaded.arch == "cnn" and loaded.arch_config["width"] == 4 and loaded.dataset == "digits"
    assert loaded.meta["seed"] == 0 and len(loaded.meta["metrics"]["history"]) == 1
    assert loaded.sha256 in proc.stdout
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "x.pt"]


def test_train_on_user_csv_quietly(tmp_path: Path, run_bnfold: RunBnfold) -> None:
    rng = np.random.default_rng(0)
    lines = ["f1,f2,kind"] + [f"{rng.normal() + 3 * (i % 2):.4f},{rng.normal():.4f},{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    proc = run_bnfold("train", "--arch", "mlp", "--data", "t.csv", "--label-column", "kind", "--epochs", "3",
                      "--quiet", "-o", "m.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.class_labels == ["a", "b"] and loaded.input_shape == (2,)
    assert loaded.model(torch.zeros(1, 2)).shape == (1, 2)


def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, run_bnfold: RunBnfold) -> None:
    np.savez(tmp_path / "bad.npz", X=np.zeros((2, 3), dtype=np.float32), y=np.array([0, 1, 0]))
    proc = run_bnfold("train", "--data", "bad.npz", "-o", "out.pt", "--plot", "c.png", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "bnfold: error: bad.npz: X has 2 samples but y has 3\n"
    assert proc.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--data", "missing.npz"], "bnfold: error: data path 'missing.npz' does not exist",
                     id="missing-data"),
        pytest.param(["--arch", "cnn", "--dataset", "breast-cancer"],
                     "bnfold: error: cnn needs image inputs (C, H, W) but breast-cancer has tabular samples",
                     id="arch"),
        pytest.param(["--arch-config", "{width: 3}"], "bnfold: error: --arch-config is not valid JSON", id="bad-json"),
        pytest.param(["--arch-config", "[3]"], "bnfold: error: --arch-config must be a JSON object", id="json-list"),
        pytest.param(["--epochs", "0"], "bnfold: error: epochs must be a positive integer, got 0", id="zero-epochs"),
    ],
)
def test_bad_input_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                              args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args, "-o", "out.pt", "--plot", "c.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_registry_and_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from bnfold.archs import ARCHITECTURES
    from bnfold.data import BUNDLED

    assert tuple(ARCHITECTURES) == ARCH_NAMES and DATASET_NAMES == BUNDLED
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "bnfold train -o digits_cnn.pt" in out


@pytest.mark.slow
def test_ctrl_c_saves_the_best_epoch_so_far_and_says_where(tmp_path: Path, bnfold_argv: list[str]) -> None:
    import os
    import re
    import signal

    # As from a terminal: a test run started in the background by a shell without job control inherits an
    # ignored SIGINT, which Python then keeps ignoring (no KeyboardInterrupt: all 500 epochs ran).
    proc = subprocess.Popen([*bnfold_argv, "train", "--epochs", "500", "--width", "4", "--depth", "1",
                             "-o", "x.pt", "--plot", "c.png"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # blocks until the first epoch ends, however loaded the machine is
        seen.append(line)
        if re.match(r"epoch +1/500  loss ", line):
            break
    else:
        raise AssertionError(f"no first epoch line: {seen}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, (out, err)
    done = int(re.search(r"interrupted after epoch (\d+) of 500; x.pt holds the best epoch so far \((\d+)\)",
                         err).group(1))
    loaded = load_model(tmp_path / "x.pt")
    metrics = loaded.meta["metrics"]
    assert metrics["interrupted"] is True and metrics["epochs_planned"] == 500
    assert len(metrics["history"]) == done and 1 <= metrics["best_epoch"] <= done < 500
    assert out.startswith(f"saved x.pt: cnn on digits, best epoch {metrics['best_epoch']} of {done} run, 500 planned")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "x.pt"]
