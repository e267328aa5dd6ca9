"""bnfold.export: ONNX export (dynamic batch, names, opset, checker) and reading ONNX files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import bnfold
from bnfold.archs import build_model
from bnfold.errors import BnfoldError
from bnfold.export import graph_input, has_dynamic_batch, op_counts, read_onnx, sample_shape, to_onnx
from bnfold.verification import ort_runner


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize("exporter", [pytest.param("torchscript", id="torchscript"),
                                      pytest.param("dynamo", id="dynamo", marks=pytest.mark.slow)])
def test_export_has_dynamic_batch_stable_names_and_matches_pytorch(exporter: str) -> None:
    folded = bnfold.fold(_model()).model
    proto = to_onnx(folded, (3, 8), exporter=exporter)  # type: ignore[arg-type]
    assert graph_input(proto) == ("input", ["batch", 3, 8])
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert has_dynamic_batch(proto)
    assert "BatchNormalization" not in op_counts(proto)
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    run = ort_runner(proto)
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8)).astype(np.float32)
        with torch.no_grad():
            expected = folded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run(x), expected, rtol=0, atol=1e-5)


def test_torchscript_export_keeps_the_requested_opset() -> None:
    proto = to_onnx(_model(), (3, 8), opset=17)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]


_LAYER_OPS = {"Conv", "Relu", "MaxPool", "Pad", "GlobalAveragePool", "Flatten", "Gemm"}


@pytest.mark.parametrize("keep_batchnorm", [pytest.param(False, id="folded"), pytest.param(True, id="keep-batchnorm")])
def test_export_folds_the_replicate_padding_constant_chain(keep_batchnorm: bool) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10).eval()  # digits' arch: replicate padding
    exported = model if keep_batchnorm else bnfold.fold(model).model
    proto = to_onnx(exported, (1, 8, 8), keep_batchnorm=keep_batchnorm)
    ops = op_counts(proto)
    expected = _LAYER_OPS | ({"BatchNormalization", "Mul", "Add"} if keep_batchnorm else set())  # Mul/Add: InputNorm
    assert set(ops) == expected and ops["Pad"] == 1
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(ort_runner(proto)(x), reference, rtol=0, atol=1e-5)


def test_keep_batchnorm_exports_an_unfolded_graph_with_constant_weights() -> None:
    proto = to_onnx(_model(), (3, 8), keep_batchnorm=True)
    assert op_counts(proto)["BatchNormalization"] == 1
    produced = {out for node in proto.graph.node for out in node.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in produced  # the weight is an initializer, not computed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"opset": 13}, "opset must be >= 17", id="old-opset"),
        pytest.param({"input_shape": (0, 8)}, "positive dimensions", id="zero-dim"),
        pytest.param({"exporter": "magic"}, "exporter must be", id="unknown-exporter"),
    ],
)
def test_export_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"input_shape": (3, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        to_onnx(_model(), **args)


def test_export_failure_is_a_bnfold_error() -> None:
    with pytest.raises(BnfoldError, match=r"ONNX export \(torchscript\) failed"):
        to_onnx(_model(), (5, 8))  # wrong channel count: the trace fails


def _identity_model(dims: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_read_onnx_and_sample_shape(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_identity_model(["N", 2, 3]), str(path))
    model = read_onnx(path)
    assert sample_shape(model) == [2, 3]
    onnx.save(_identity_model(["N", "C", 3]), str(path))
    with pytest.raises(BnfoldError, match=r"every axis but the first"):
        sample_shape(read_onnx(path))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("missing", "does not exist", id="missing"),
        pytest.param("directory", "is a directory", id="directory"),
        pytest.param("random-bytes", "not a valid ONNX model", id="random-bytes"),
        pytest.param("checker", "fails the ONNX checker", id="fails-checker"),
    ],
)
def test_read_onnx_bad_files(tmp_path, setup: str, message: str) -> None:
    path = tmp_path / "m.onnx"
    if setup == "directory":
        path.mkdir()
    elif setup == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif setup == "checker":
        bad = _identity_model(["N", 2])
        bad.graph.node[0].input[0] = "undefined"  # uses a value nothing produces
        onnx.save(bad, str(path))
    with pytest.raises(BnfoldError, match=message):
        read_onnx(path)
