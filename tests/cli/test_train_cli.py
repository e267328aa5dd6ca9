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
    assert proc.stdout.startswith("saved x.pt: cnn on digits, best epoch 1/1, val accuracy ")
    assert "epoch 1/1" in proc.stderr  # the progress bar
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
