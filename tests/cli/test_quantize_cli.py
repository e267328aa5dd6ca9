"""``bnfold fold --quantize int8`` and ``bnfold quickstart --quantize int8`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import certificate
from bnfold.verification import ort_runner


def _case(root: Path, *, head_gap: float | None) -> tuple[Path, Path]:
    """Gemm -> Relu -> Gemm on 6 features, 3 classes, and 300 samples it labels itself. With ``head_gap``
    the class scores differ by about that fraction of their size: finer than int8 resolves."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 3)) if head_gap is None else 1 + head_gap * rng.standard_normal((16, 3))
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1"], ["h"], name="hidden"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], name="head")], "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "model.onnx")
    x = rng.standard_normal((300, 6)).astype(np.float32)
    np.savez(root / "data.npz", X=x, y=ort_runner(model)(x).argmax(axis=1))
    return root / "model.onnx", root / "data.npz"


def _files(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


@pytest.mark.slow
def test_quickstart_quantize_int8_writes_an_int8_version_with_its_evidence(run_bnfold, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    proc = run_bnfold("quickstart", "--no-serve", "--quantize", "int8", "--repository", repo, "--epochs", "3",
                      "--report", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    assert "int8: passed, minmax calibration on 256 digits train samples" in proc.stdout
    model = onnx.load(str(repo / "digits" / "1" / "model.onnx"))
    cert = certificate.read({e.key: e.value for e in model.metadata_props})
    assert cert is not None and cert.kind == "int8" and cert.quantization is not None
    q = cert.quantization
    assert q["agreement"] >= 0.99 and q["agreement_samples"] == 359 and q["agreement_inputs"] == "digits validation"
    assert q["float_accuracy"] - q["int8_accuracy"] <= 0.005 and q["samples"] == 256
    assert f"{q['agreement']:.2%} with the float model on 359 digits" in " ".join(proc.stdout.split())
    assert cert.check(ort_runner(model, optimize=True)).passed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "int8" and report["quantization"]["measured"]["agreement"] == q["agreement"]


def test_a_miss_exits_1_shows_sensitivity_and_writes_only_the_report(run_bnfold, tmp_path: Path) -> None:
    model, data = _case(tmp_path, head_gap=1e-3)
    before = _files(tmp_path)
    proc = run_bnfold("fold", model, "--quantize", "int8", "--calibration-data", data, "-o", tmp_path / "int8.onnx",
                      "--report", tmp_path / "report.json")
    assert proc.returncode == 1, proc.stderr
    assert _files(tmp_path) == before | {"report.json"}
    assert "sensitivity: each layer alone kept in float, most sensitive first" in proc.stdout
    assert "no model was written" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("bnfold: error: the int8 model misses its contract")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["quantization"]["sensitivity"][0]["layer"] == "head"


def test_keep_float_auto_keeps_the_sensitive_layer(run_bnfold, tmp_path: Path) -> None:
    model, data = _case(tmp_path, head_gap=1e-3)
    proc = run_bnfold("fold", model, "--quantize", "int8", "--calibration-data", data, "-o", tmp_path / "int8.onnx",
                      "--keep-float", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "kept in float               head" in proc.stdout
    cert = certificate.read({e.key: e.value for e in onnx.load(str(tmp_path / "int8.onnx")).metadata_props})
    assert cert is not None and cert.quantization is not None and cert.quantization["kept_float"] == ["head"]


@pytest.mark.parametrize(("samples", "message"), [
    pytest.param(np.zeros((300, 7)), "calibration data: validation samples of", id="wrong-shape"),
    pytest.param(np.zeros((12, 6)), "fewer than the 16 needed", id="too-few"),
    pytest.param(np.where(np.eye(300, 6) > 0, np.nan, 0.0), "NaN/inf value", id="nan"),
])
def test_bad_calibration_data_exits_2_with_one_line(run_bnfold, tmp_path: Path, samples: np.ndarray,
                                                    message: str) -> None:
    model, _ = _case(tmp_path, head_gap=None)
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=samples.astype(np.float32), y=np.arange(samples.shape[0]) % 3)
    before = _files(tmp_path)
    proc = run_bnfold("fold", model, "--quantize", "int8", "--calibration-data", bad, "-o", tmp_path / "int8.onnx",
                      "--report", tmp_path / "report.json", "--quiet")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and message in lines[0], proc.stderr
    assert _files(tmp_path) == before


def test_quantization_options_need_quantize(run_bnfold, tmp_path: Path) -> None:
    model, _ = _case(tmp_path, head_gap=None)
    proc = run_bnfold("fold", model, "-o", tmp_path / "out.onnx", "--keep-float", "auto")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bnfold: error: --keep-float is an option of --quantize int8; add --quantize int8"
