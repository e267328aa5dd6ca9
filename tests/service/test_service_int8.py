"""An int8 version served next to the float version of the same model, its certificate re-checked at load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from bnfold import certificate, pipeline
from bnfold.quantize import QuantizeOptions
from bnfold.verification import ort_runner
from service.config import Settings
from service.main import create_app


def _classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1"], ["h"], name="hidden"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], name="head")], "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``m``: version 1 float, version 2 int8 of it, version 3 int8 with a tampered self-test output."""
    root = tmp_path_factory.mktemp("int8")
    model = _classifier()
    onnx.save(model, root / "model.onnx")
    x = np.random.default_rng(4).standard_normal((4000, 6)).astype(np.float32)
    scores = np.sort(ort_runner(model)(x), axis=1)
    x = x[scores[:, -1] - scores[:, -2] > 1.0][:300]  # answers int8 keeps: clear margins
    np.savez(root / "data.npz", X=x, y=ort_runner(model)(x).argmax(axis=1))
    repo = root / "models"
    pipeline.run(root / "model.onnx", repository_dir=repo, name="m")
    pipeline.run(root / "model.onnx", repository_dir=repo, name="m",
                 quantize=QuantizeOptions(calibration_data=str(root / "data.npz"), samples=64))
    int8 = onnx.load(str(repo / "m" / "2" / "model.onnx"))
    cert = certificate.read({e.key: e.value for e in int8.metadata_props})
    assert cert is not None and cert.quantization is not None
    cert.selftest_output = cert.selftest_output + 5 * cert.quantization["output_scale"]  # 5 steps: over the 4 allowed
    certificate.attach(int8, cert)
    (repo / "m" / "3").mkdir()
    onnx.save(int8, repo / "m" / "3" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def client(repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_repository=repository, intra_op_threads=1))) as test_client:
        yield test_client


def test_float_and_int8_versions_serve_side_by_side(client: TestClient) -> None:
    one = client.get("/v2/models/m/versions/1").json()
    two = client.get("/v2/models/m/versions/2").json()
    assert one["ready"] and two["ready"]
    assert one["certificate"]["kind"] == "float" and one["certificate"]["quantized"] is False
    assert "quantization" not in one["certificate"]
    assert two["certificate"]["kind"] == "int8" and two["certificate"]["quantized"] is True
    q = two["certificate"]["quantization"]
    assert q["agreement"] >= 0.99 and q["method"] == "minmax" and q["samples"] == 64
    assert two["certificate"]["selftest"]["passed"] is True
    assert two["certificate"]["tolerance"] == {"atol": 4 * q["output_scale"], "rtol": 0.0}


def test_int8_inference_matches_the_file_in_onnxruntime(client: TestClient, repository: Path) -> None:
    x = np.random.default_rng(5).standard_normal((8, 6)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 6], "data": x.ravel().tolist()}]}
    answers = {}
    for version in ("1", "2"):
        response = client.post(f"/v2/models/m/versions/{version}/infer", json=body)
        assert response.status_code == 200, response.text
        answers[version] = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(8, 3)
    expected = ort_runner(onnx.load(str(repository / "m" / "2" / "model.onnx")), optimize=True)(x)
    np.testing.assert_array_equal(answers["2"], expected)  # integer kernels: the same numbers, not close ones
    assert np.mean(answers["2"].argmax(axis=1) == answers["1"].argmax(axis=1)) >= 0.75


def test_an_int8_self_test_off_by_more_than_its_tolerance_is_not_ready(client: TestClient) -> None:
    three = client.get("/v2/models/m/versions/3").json()
    assert not three["ready"] and "self-test output differs from the certificate" in three["reason"]
    assert client.get("/v2/models/m/versions/3/ready").status_code == 503
    assert client.get("/v2/models/m/versions/2/ready").status_code == 200  # the others still serve
