"""``bnfold verify A B``: equivalence of any two models, exit 1 when they differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import pipeline


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "conv1d.onnx"
    pipeline.run(trained["conv1d"], output=out, config=pipeline.Config(n_random=8, max_data=32))
    return out


@pytest.mark.slow
def test_checkpoint_vs_its_export_passes(trained: dict[str, Path], exported: Path, run_bnfold,
                                         tmp_path: Path) -> None:
    report = tmp_path / "verify.json"
    proc = run_bnfold("verify", trained["conv1d"], exported, "--report", report)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(report.read_text())
    assert body["passed"] is True
    assert set(body["checks"]) == {"random", "digits validation"}
    for check in body["checks"].values():
        assert check["max_abs_error"] < 1e-5 and check["top1_agreement"] == 1.0
        assert check["reference"] == "conv1d.pt (float64)"


@pytest.mark.slow
def test_a_changed_model_fails_with_exit_1(trained: dict[str, Path], exported: Path, run_bnfold,
                                           tmp_path: Path) -> None:
    model = onnx.load(str(exported))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-2), bias.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    proc = run_bnfold("verify", trained["conv1d"], changed, "--quiet")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "verification: FAILED, 2 of 2 checks over the allowed error" in proc.stdout
    assert proc.stderr.startswith("bnfold: error: ") and len(proc.stderr.splitlines()) == 1
    assert f"changed.onnx differs from {trained['conv1d']}" in proc.stderr
