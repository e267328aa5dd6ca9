"""bnfold.quantize: int8 quantization of an ONNX input, its contract, its certificate, its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import certificate, pipeline
from bnfold.data import load_dataset
from bnfold.errors import BnfoldError
from bnfold.quantize import Bounds, QuantizationFailed, QuantizedOutcome, QuantizeOptions, contract, static
from bnfold.verification import ort_runner

FEATURES, HIDDEN, CLASSES = 6, 16, 3


def classifier(head_gap: float | None = None, seed: int = 0) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm. ``head_gap``: class scores that differ only by that fraction (int8 cannot tell them)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32)
    if head_gap is not None:
        w2 = (1 + head_gap * rng.standard_normal((HIDDEN, CLASSES))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1"], ["h"], name="hidden"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], name="head")], "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_case(root: Path, model: onnx.ModelProto, *, n: int = 400, margin: float = 1.0, seed: int = 1) -> tuple[
        Path, Path]:
    """The model file and an .npz of samples labelled by the float model, whose top two scores differ by ``margin``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((20 * n, FEATURES)).astype(np.float32)
    scores = ort_runner(model)(x)
    top = np.sort(scores, axis=1)
    x = x[(top[:, -1] - top[:, -2]) >= margin][:n] if margin > 0 else x[:n]
    assert x.shape[0] == n
    onnx.save(model, root / "model.onnx")
    np.savez(root / "data.npz", X=x, y=ort_runner(model)(x).argmax(axis=1))
    return root / "model.onnx", root / "data.npz"


def test_int8_model_meets_contract_and_certifies_what_it_measured(tmp_path: Path) -> None:
    model_path, data = write_case(tmp_path, classifier())
    out = tmp_path / "int8.onnx"
    outcome = pipeline.run(model_path, output=out, quantize=QuantizeOptions(calibration_data=str(data), samples=64))
    assert isinstance(outcome, QuantizedOutcome) and outcome.quantization is not None
    written = onnx.load(str(out))
    ops = {n.op_type for n in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    cert = certificate.read({e.key: e.value for e in written.metadata_props})
    assert cert is not None and cert.kind == "int8" and cert.quantization is not None
    q = cert.quantization
    measured = outcome.quantization.final.measured
    held_out = load_dataset(path=data).X_val.shape[0]  # the validation split: never calibrated on
    assert q["agreement"] == measured.agreement >= 0.99 and q["agreement_samples"] == held_out > 60
    assert q["samples"] == 64 and q["method"] == "minmax" and q["kept_float"] == []
    assert q["float_accuracy"] == 1.0 and q["int8_accuracy"] == measured.int8_accuracy >= 0.995
    assert q["agreement_inputs"] == f"{data} validation" and q["calibration_data"] == f"{data} train"
    # The tolerance is 4 steps of the output's quantization grid, the scale of the last DequantizeLinear.
    assert cert.tolerance.rtol == 0.0
    assert cert.tolerance.atol == pytest.approx(contract.SELFTEST_STEPS * q["output_scale"], rel=1e-12)
    assert cert.check(ort_runner(written, optimize=True)).passed and cert.check(ort_runner(written)).passed
    # The float model it came from: its errors are kept and its bytes named.
    assert cert.errors == outcome.float_certificate.errors and len(q["float_model_sha256"]) == 64


def test_output_scale_is_the_last_dequantize_scale(tmp_path: Path) -> None:
    model_path, data = write_case(tmp_path, classifier())
    x = np.load(data)["X"][:64]
    quantized = static.quantize(static.named(onnx.load(str(model_path))), x)
    scale_name = next(n for n in quantized.graph.node if "logits" in n.output).input[1]
    scale = next(numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name == scale_name)
    assert contract.output_scale(quantized, np.ones((1, CLASSES))) == float(scale)
    # Without a dequantized output (the head kept in float), one int8 step of the output's range.
    kept = static.quantize(static.named(onnx.load(str(model_path))), x, exclude=["head"])
    assert contract.output_scale(kept, np.array([[-2.54, 1.0, 0.5]])) == pytest.approx(2.54 / 127, rel=1e-12)


def test_miss_raises_with_sensitivity_and_auto_keeps_the_sensitive_layer(tmp_path: Path) -> None:
    model_path, data = write_case(tmp_path, classifier(head_gap=1e-3), margin=0.0)
    with pytest.raises(QuantizationFailed, match=r"top-1 agreement with the float model .* < 99\.00%") as info:
        pipeline.run(model_path, output=tmp_path / "int8.onnx", report=tmp_path / "r.json",
                     quantize=QuantizeOptions(calibration_data=str(data)))
    assert not (tmp_path / "int8.onnx").exists()
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["passed"] is False and body["kind"] == "int8" and body["quantization"]["passed"] is False
    ranked = [row["layer"] for row in body["quantization"]["sensitivity"]]
    assert ranked == [row.name for row in info.value.report.sensitivity] and sorted(ranked) == ["head", "hidden"]
    assert ranked[0] == "head"  # the layer whose tiny score gaps int8 rounds away
    outcome = pipeline.run(model_path, output=tmp_path / "int8.onnx",
                           quantize=QuantizeOptions(calibration_data=str(data), keep_float="auto"))
    assert outcome.quantization is not None and outcome.quantization.final.kept_float == ("head",)
    cert = certificate.read({e.key: e.value for e in onnx.load(str(tmp_path / "int8.onnx")).metadata_props})
    assert cert is not None and cert.quantization is not None and cert.quantization["kept_float"] == ["head"]


@pytest.mark.parametrize(("bounds", "passes"), [
    pytest.param(Bounds(min_agreement=0.9, max_accuracy_drop=0.05), True, id="within"),
    pytest.param(Bounds(min_agreement=0.96, max_accuracy_drop=0.05), False, id="agreement-missed"),
    pytest.param(Bounds(min_agreement=0.9, max_accuracy_drop=0.01), False, id="accuracy-drop-missed"),
])
def test_contract_reason_names_the_values(bounds: Bounds, passes: bool) -> None:
    measured = contract.Measured(agreement=0.95, samples=100, inputs="digits validation", float_accuracy=0.99,
                                 int8_accuracy=0.97, mean_abs_error=0.1)
    reason = measured.reason(bounds)
    assert (reason is None) == passes
    if not passes:
        assert ("95.00% < 96.00%" in reason) or ("dropped 2.00 points (99.00% float, 97.00% int8) > 1" in reason)


def test_measure_without_labels_measures_agreement_only() -> None:
    f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.2, 0.1]])
    measured = contract.measure(f, lambda x: f[: len(x)][:, ::-1].copy(), np.zeros((4, 1), np.float32), None,
                                "calibration")
    assert measured.agreement == 0.0 and measured.float_accuracy is None and measured.accuracy_drop is None
    assert measured.reason(Bounds(min_agreement=0.0)) is None


@pytest.mark.parametrize(("x", "message"), [
    pytest.param(np.zeros((400, FEATURES + 1)), r"have shape \[7\] but the model expects \[6\]", id="wrong-shape"),
    pytest.param(np.zeros((12, FEATURES)), "fewer than the 16 needed", id="too-few"),
    pytest.param(np.where(np.eye(400, FEATURES) > 0, np.nan, 0.0), "NaN/inf value", id="nan"),
])
def test_bad_calibration_data_is_refused_before_any_work(tmp_path: Path, x: np.ndarray, message: str) -> None:
    model_path, _ = write_case(tmp_path, classifier())
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=x.astype(np.float32), y=np.arange(x.shape[0]) % CLASSES)
    with pytest.raises(BnfoldError, match=message) as info:
        pipeline.run(model_path, output=tmp_path / "int8.onnx", quantize=QuantizeOptions(calibration_data=str(bad)))
    assert info.value.exit_code == 2 and not (tmp_path / "int8.onnx").exists()


def test_onnx_input_without_calibration_data_is_refused(tmp_path: Path) -> None:
    model_path, _ = write_case(tmp_path, classifier())
    with pytest.raises(BnfoldError, match="an ONNX file records no data set; pass --calibration-data"):
        pipeline.run(model_path, output=tmp_path / "int8.onnx", quantize=QuantizeOptions())


def test_unknown_keep_float_layer_names_the_layers(tmp_path: Path) -> None:
    model_path, data = write_case(tmp_path, classifier())
    with pytest.raises(BnfoldError, match=r"'conv9', not a layer of the model; its layers: head, hidden"):
        pipeline.run(model_path, output=tmp_path / "int8.onnx",
                     quantize=QuantizeOptions(calibration_data=str(data), keep_float=("conv9",)))
