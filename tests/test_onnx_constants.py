"""bnfold.onnx_constants: constant subgraphs become initializers; guards keep what must stay."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold.export import op_counts
from bnfold.onnx_constants import MAX_BYTES, fold_constants
from bnfold.verification import ort_runner

_SHAPE_OPS = {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast"}


def _replicate_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="replicate"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def _raw_torchscript_export(model: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros((2, *shape)),), buf, dynamo=False, opset_version=17,  # type: ignore[arg-type]
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def test_replicate_padding_chain_folds_to_one_initializer_with_identical_outputs() -> None:
    before = _raw_torchscript_export(_replicate_cnn(), (1, 8, 8))
    assert _SHAPE_OPS & set(op_counts(before))  # the exporter did write the chain
    result = fold_constants(before)
    after = result.model
    assert op_counts(after) == {"Conv": 2, "Relu": 2, "Pad": 1, "MaxPool": 1, "GlobalAveragePool": 1,
                                "Flatten": 1, "Gemm": 1}
    assert len(result.folded) == len(before.graph.node) - len(after.graph.node)
    assert result.kept == {}
    pad = next(n for n in after.graph.node if n.op_type == "Pad")
    pads = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}[pad.input[1]]
    np.testing.assert_array_equal(pads, [0, 0, 1, 1, 0, 0, 1, 1])
    assert [v.name for v in after.graph.input] == ["input"] and [v.name for v in after.graph.output] == ["logits"]
    names = [t.name for t in after.graph.initializer]
    assert len(names) == len(set(names))
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(ort_runner(after)(x), ort_runner(before)(x))  # ORT_DISABLE_ALL, bit-exact
    onnx.checker.check_model(after, full_check=True)


def test_metadata_and_input_model_are_kept() -> None:
    before = _raw_torchscript_export(_replicate_cnn(), (1, 8, 8))
    helper.set_model_props(before, {"bnfold.certificate": "{}"})
    copy = before.SerializeToString()
    after = fold_constants(before).model
    assert {p.key: p.value for p in after.metadata_props} == {"bnfold.certificate": "{}"}
    assert before.SerializeToString() == copy


def _graph(nodes: list[onnx.NodeProto], initializers: Sequence[tuple[str, np.ndarray]] = (),
           extra_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a, n) for n, a in initializers]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              initializer=inits)
    return helper.make_model(graph, ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])


_ONES = np.ones((2, 3), np.float32)
_SHAPE = np.array([2, 3], np.int64)


@pytest.mark.parametrize(
    ("model", "kept_ops", "reason"),
    [
        pytest.param(_graph([helper.make_node("RandomUniform", [], ["r"], shape=[2, 3], seed=1.0),
                             helper.make_node("Add", ["x", "r"], ["y"])]),
                     ["RandomUniform", "Add"], None, id="random-op"),
        pytest.param(_graph([helper.make_node("RandomUniformLike", ["c"], ["r"]),
                             helper.make_node("Add", ["x", "r"], ["y"])], [("c", _ONES)]),
                     ["RandomUniformLike", "Add"], "is random", id="random-op-with-constant-input"),
        pytest.param(_graph([helper.make_node("Mul", ["c", "c"], ["m"]), helper.make_node("Add", ["x", "m"], ["y"])],
                            [("c", _ONES)], extra_inputs=["c"]),
                     ["Mul", "Add"], None, id="initializer-that-is-a-graph-input"),
        pytest.param(_graph([helper.make_node("Neg", ["c"], ["m"], domain="custom"),
                             helper.make_node("Add", ["x", "m"], ["y"])], [("c", _ONES)]),
                     ["Neg", "Add"], "not in the default ONNX domain", id="custom-domain"),
        pytest.param(_graph([helper.make_node("Neg", ["c"], ["y"])], [("c", _ONES)]),
                     ["Neg"], "graph outputs", id="produces-graph-output"),
    ],
)
def test_guards_keep_nodes_unfolded(model: onnx.ModelProto, kept_ops: list[str], reason: str | None) -> None:
    result = fold_constants(model)
    assert [n.op_type for n in result.model.graph.node] == kept_ops
    assert result.folded == []
    if reason is not None:
        assert reason in next(iter(result.kept.values()))


def test_subgraph_op_is_not_folded() -> None:
    def branch(name: str, value: float) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3])
        return helper.make_graph([helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.full((2, 3), value, np.float32)))], name, [], [out])

    model = _graph([helper.make_node("If", ["cond"], ["b"], then_branch=branch("t", 1.0), else_branch=branch("e", 2.0)),
                    helper.make_node("Add", ["x", "b"], ["y"])], [("cond", np.array(True))])
    result = fold_constants(model)
    assert [n.op_type for n in result.model.graph.node] == ["If", "Add"]
    assert "has a subgraph" in result.kept["If"]
    assert [t.name for t in result.model.graph.initializer] == ["cond"]


@pytest.mark.parametrize(
    ("shape", "max_bytes", "folded"),
    [
        pytest.param([512, 1024], MAX_BYTES, False, id="2MiB-over-default-cap"),
        pytest.param([256, 1024], MAX_BYTES, True, id="1MiB-at-default-cap"),
        pytest.param([2, 3], 23, False, id="24B-over-23B-cap"),
        pytest.param([2, 3], 24, True, id="24B-at-24B-cap"),
    ],
)
def test_size_cap(shape: list[int], max_bytes: int, folded: bool) -> None:
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    model = _graph(nodes, [("s", np.array(shape, np.int64))])
    result = fold_constants(model, max_bytes=max_bytes)
    ops = [n.op_type for n in result.model.graph.node]
    if folded:
        assert ops == ["Add"]
        total = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["total"]
        assert total == np.prod(shape)
    else:
        assert ops == ["ConstantOfShape", "ReduceSum", "Add"]
        assert f"more than the cap of {max_bytes}" in result.kept["ConstantOfShape"]
    assert all(len(t.raw_data) <= max_bytes for t in result.model.graph.initializer)


def test_folds_through_constant_nodes_and_removes_orphaned_initializers() -> None:
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
             helper.make_node("Reshape", ["c", "s"], ["r"]), helper.make_node("Mul", ["r", "k"], ["m"]),
             helper.make_node("Add", ["x", "m"], ["y"])]
    model = _graph(nodes, [("c", np.arange(6, dtype=np.float32)), ("s", _SHAPE), ("unused", _ONES)])
    result = fold_constants(model)
    assert [n.op_type for n in result.model.graph.node] == ["Add"]
    assert result.folded == ["Constant", "Reshape", "Mul"]
    assert [t.name for t in result.model.graph.initializer] == ["m"]
    x = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(ort_runner(result.model)(x), np.arange(6, dtype=np.float32).reshape(2, 3) * 2)


def test_negative_cap_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        fold_constants(_graph([helper.make_node("Relu", ["x"], ["y"])]), max_bytes=-1)
