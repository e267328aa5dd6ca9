"""``bnfold quickstart --no-serve``: train, fold, verify, export into a model repository."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from bnfold import certificate
from bnfold.export import op_counts
from bnfold.verification import ort_runner


@pytest.mark.slow
def test_quickstart_writes_a_certified_first_version(run_bnfold, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    proc = run_bnfold("quickstart", "--no-serve", "--repository", repo, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    path = repo / "digits" / "1" / "model.onnx"
    model = onnx.load(str(path))
    assert "BatchNormalization" not in op_counts(model)
    cert = certificate.read({e.key: e.value for e in model.metadata_props})
    assert cert is not None and cert.architecture == "cnn" and len(cert.class_labels) == 10
    assert cert.check(ort_runner(model)).passed
    assert "curl -s -X POST http://127.0.0.1:8000/v2/models/digits/versions/1/infer" in proc.stdout
