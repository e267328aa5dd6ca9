"""A model trained on the user's CSV: its data is found from anywhere, its features travel with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow


def _csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["width,kind,height,weight"] + [
        f"{rng.normal() + 3 * (i % 2):.4f},{'ab'[i % 2]},{rng.normal():.4f},{rng.normal() - i % 2:.4f}"
        for i in range(60)]
    path.write_text("\n".join(rows) + "\n")


def test_csv_checkpoint_verifies_on_its_data_from_anywhere(run_bnfold, tmp_path: Path) -> None:
    train_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (train_dir / "data").mkdir(parents=True)
    elsewhere.mkdir()
    _csv(train_dir / "data" / "t.csv")
    proc = run_bnfold("train", "--arch", "mlp", "--data", "data/t.csv", "--label-column", "kind", "--epochs", "2",
                      "--quiet", "-o", "m.pt", cwd=train_dir)
    assert proc.returncode == 0, proc.stderr

    # From another directory: the data path was relative to the training directory, and still loads.
    proc = run_bnfold("fold", train_dir / "m.pt", "-o", "m.onnx", "--report", "r.json", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    body = json.loads((elsewhere / "r.json").read_text())
    assert set(body["checks"]) == {"pytorch/random", "pytorch/data/t.csv validation", "onnxruntime/random",
                                   "onnxruntime/data/t.csv validation"}
    assert body["checks"]["pytorch/data/t.csv validation"]["n_samples"] == 12  # the label column was found too

    # The model says which feature goes where, and what each output means.
    meta = {p.key: p.value for p in onnx.load(str(elsewhere / "m.onnx")).metadata_props}
    assert json.loads(meta["bnfold.feature_names"]) == ["width", "height", "weight"]
    assert json.loads(meta["bnfold.class_labels"]) == ["a", "b"]
    assert json.loads(meta["bnfold.input_shape"]) == [3]
    proc = run_bnfold("inspect", elsewhere / "m.onnx")
    assert "features      3, in input order: width, height, weight" in proc.stdout

    # Checkpoint and data moved together: found relative to the checkpoint.
    moved = tmp_path / "moved"
    shutil.move(train_dir, moved)
    proc = run_bnfold("fold", moved / "m.pt", "-o", "m2.onnx", "--report", "r2.json", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "pytorch/data/t.csv validation" in json.loads((elsewhere / "r2.json").read_text())["checks"]

    # Data gone: random inputs only, and the note says what to do.
    (moved / "data" / "t.csv").unlink()
    proc = run_bnfold("fold", moved / "m.pt", "-o", "m3.onnx", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    note = " ".join(proc.stdout.split())
    assert "note: verified on random inputs only: the checkpoint's data set 'data/t.csv' did not load" in note
    assert "pass --data PATH to verify on it" in note
