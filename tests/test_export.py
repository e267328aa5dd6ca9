"""bnfold.export: ONNX export (dynamic batch, names, opset, checker) and reading ONNX files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import bnfold
from bnfold import export
from bnfold.archs import build_model
from bnfold.errors import BnfoldError
from bnfold.export import (
    batchnorm_nodes,
    export_model,
    graph_input,
    has_dynamic_batch,
    op_counts,
    read_onnx,
    sample_shape,
    to_onnx,
)
from bnfold.verification import ort_runner


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval()


EXPORTERS = [pytest.param("dynamo", id="dynamo"), pytest.param("torchscript", id="torchscript")]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_has_dynamic_batch_stable_names_and_matches_pytorch(exporter: str) -> None:
    folded = bnfold.fold(_model()).model
    exported = export_model(folded, (3, 8), exporter=exporter)  # type: ignore[arg-type]
    proto = exported.model
    assert exported.exporter == exporter and exported.fallback is None
    assert graph_input(proto) == ("input", ["batch", 3, 8])
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert has_dynamic_batch(proto)
    assert "BatchNormalization" not in op_counts(proto)
    assert exported.opset == 17 and exported.opset_note is None  # this graph converts down from 18
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces naming local files
    run = ort_runner(proto)
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8)).astype(np.float32)
        with torch.no_grad():
            expected = folded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run(x), expected, rtol=0, atol=1e-5)


def test_auto_export_uses_the_dynamo_exporter() -> None:
    exported = export_model(_model(), (3, 8))
    assert (exported.exporter, exported.fallback, exported.notes) == ("dynamo", None, [])


def test_torchscript_export_keeps_the_requested_opset() -> None:
    proto = to_onnx(_model(), (3, 8), opset=17, exporter="torchscript")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", input_shape=(1, 8, 8), num_classes=10).eval()  # digits' arch: replicate padding


def test_dynamo_export_says_when_it_keeps_a_higher_opset() -> None:
    exported = export_model(bnfold.fold(_digits_cnn()).model, (1, 8, 8), opset=17, exporter="dynamo")
    assert exported.opset == 18 and export.opset_of(exported.model) == 18
    assert exported.opset_note is not None and "not the 17 asked for" in exported.opset_note
    assert "Pad" in exported.opset_note  # the op the ONNX converter has no down-adapter for
    assert export_model(bnfold.fold(_digits_cnn()).model, (1, 8, 8), opset=18).opset_note is None


_LAYER_OPS = {
    "torchscript": {"Conv", "Relu", "MaxPool", "Pad", "GlobalAveragePool", "Flatten", "Gemm"},
    "dynamo": {"Conv", "Relu", "MaxPool", "Pad", "ReduceMean", "Reshape", "Gemm"},
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("fold", [pytest.param(True, id="folded"), pytest.param(False, id="unfolded")])
def test_export_folds_constants_and_fuses_no_batch_norm(exporter: str, fold: bool) -> None:
    model = _digits_cnn()
    exported = model if not fold else bnfold.fold(model).model
    proto = to_onnx(exported, (1, 8, 8), exporter=exporter)  # type: ignore[arg-type]
    ops = op_counts(proto)
    expected = _LAYER_OPS[exporter] | (set() if fold else {"BatchNormalization", "Mul", "Add"})  # Mul/Add: InputNorm
    assert set(ops) == expected and ops["Pad"] == 1
    assert ops.get("BatchNormalization", 0) == (0 if fold else 4)  # every batch norm of the model, none fused
    produced = {out for node in proto.graph.node for out in node.output}
    assert all(n.input[1] not in produced for n in proto.graph.node if n.op_type == "Conv")  # weights are constants
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(ort_runner(proto)(x), reference, rtol=0, atol=1e-5)


def test_unfolded_model_exports_its_batch_norm_with_constant_weights() -> None:
    proto = to_onnx(_model(), (3, 8))
    assert op_counts(proto)["BatchNormalization"] == 1
    produced = {out for node in proto.graph.node for out in node.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in produced  # the weight is an initializer, not computed


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.stem(x))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_records_the_module_of_each_batch_norm_and_layer(exporter: str) -> None:
    exported = export_model(_Nested().eval(), (3, 8), exporter=exporter)  # type: ignore[arg-type]
    by_op = {n.op_type: exported.modules.get(n.name) for n in exported.model.graph.node}
    assert by_op["BatchNormalization"] == "stem.1"
    assert by_op["Conv"] == "stem.0"
    assert batchnorm_nodes(exported.model) == [n.name for n in exported.model.graph.node
                                               if n.op_type == "BatchNormalization"]


def test_a_failing_dynamo_export_falls_back_to_torchscript_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("dynamo is broken today")

    monkeypatch.setattr(export, "_dynamo", broken)
    exported = export_model(_model(), (3, 8))
    assert exported.exporter == "torchscript"
    assert exported.fallback is not None and "dynamo is broken today" in exported.fallback
    assert "TorchScript" in exported.notes[0]
    with pytest.raises(BnfoldError, match=r"ONNX export \(dynamo\) failed: dynamo is broken today"):
        export_model(_model(), (3, 8), exporter="dynamo")


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


@pytest.mark.parametrize("exporter", [*EXPORTERS, pytest.param("auto", id="auto")])
def test_export_failure_is_a_bnfold_error(exporter: str) -> None:
    first = "dynamo" if exporter == "auto" else exporter
    with pytest.raises(BnfoldError, match=rf"ONNX export \({first}\) failed") as info:
        to_onnx(_model(), (5, 8), exporter=exporter)  # type: ignore[arg-type]  # wrong channel count
    assert ("TorchScript fallback" in str(info.value)) == (exporter == "auto")


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
