"""bnfold.accounting: one row per batch norm across the PyTorch and ONNX folds, checked against the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.accounting import check_against, combine, tag
from bnfold.errors import VerificationFailed
from bnfold.result import Folded, FoldResult, Skipped


def _graph_with_batchnorms(*names: str) -> onnx.ModelProto:
    """x -> BatchNormalization(names[0]) -> ... -> y, one chain of batch norms over 2 channels."""
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "b", "m", "v")]
    nodes, prev = [], "x"
    for i, name in enumerate(names):
        out = "y" if i == len(names) - 1 else f"t{i}"
        nodes.append(helper.make_node("BatchNormalization", [prev, "s", "b", "m", "v"], [out], name=name))
        prev = out
    graph = helper.make_graph(nodes or [helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PYTORCH = FoldResult(
    model=None,
    folded=[Folded("features.1", "features.0")],
    skipped=[Skipped("blocks.0.bn", "blocks.0.bn is used inside a forward() torch.fx cannot trace"),
             Skipped("input_norm", "its output goes to relu, not a layer")],
    notes=["pytorch note"],
)


def test_combine_names_onnx_rows_by_pytorch_module_and_keeps_both_reasons() -> None:
    proto = _graph_with_batchnorms("node_bn_3")
    onnx_fold = FoldResult(proto, folded=[Folded("node_bn_1", "node_conv_0")],
                           skipped=[Skipped("node_bn_3", "its input 'x' is not computed by a layer")],
                           notes=["onnx note"])
    modules = {"node_bn_1": "blocks.0.bn", "node_conv_0": "blocks.0.conv", "node_bn_3": "blocks.1.bn"}
    result = combine(PYTORCH, onnx_fold, modules)
    assert result.model is proto and result.notes == ["pytorch note", "onnx note"]
    assert result.staged_rows() == [
        ("features.1", "folded", "pytorch", "into features.0 (output side)"),
        ("blocks.0.bn", "folded", "onnx", "in ONNX, into blocks.0.conv (output side)"),
        ("blocks.1.bn", "kept", "onnx", "in ONNX: its input 'x' is not computed by a layer"),
        ("input_norm", "kept", "pytorch", "its output goes to relu, not a layer"),  # no BatchNormalization node
    ]
    assert result.counts == {"folded": 2, "kept": 2}
    assert check_against(result, proto) == 1


@pytest.mark.parametrize(
    ("modules", "names"),
    [
        pytest.param({}, ["n1", "n2"], id="unmapped-nodes-keep-their-onnx-names"),
        pytest.param({"n1": "blocks.0.bn", "n2": "blocks.0.bn"}, ["blocks.0.bn (ONNX n1)", "blocks.0.bn (ONNX n2)"],
                     id="one-module-applied-twice"),
        pytest.param({"n1": "features.1", "n2": "blocks.0.bn"}, ["features.1 (ONNX n1)", "blocks.0.bn"],
                     id="a-module-pytorch-folded-is-still-a-node"),
    ],
)
def test_combine_gives_every_onnx_node_its_own_row(modules: dict[str, str], names: list[str]) -> None:
    proto = _graph_with_batchnorms("n1", "n2")
    reason = "its input 'x' is not computed by a layer"
    result = combine(PYTORCH, FoldResult(proto, skipped=[Skipped("n1", reason), Skipped("n2", reason)]), modules)
    assert [s.bn for s in result.skipped if "onnx" in s.stage] == names
    assert check_against(result, proto) == 2


def test_kept_by_both_folds_carries_both_reasons() -> None:
    proto = _graph_with_batchnorms("n1")
    result = combine(PYTORCH, FoldResult(proto, skipped=[Skipped("n1", "nothing to fold into")]),
                     {"n1": "blocks.0.bn"})
    [row] = [s for s in result.skipped if s.bn == "blocks.0.bn"]
    assert (row.stage, row.node) == ("pytorch+onnx", "n1")
    assert row.reason == "blocks.0.bn is used inside a forward() torch.fx cannot trace; in ONNX: nothing to fold into"


@pytest.mark.parametrize(
    ("graph", "result", "message"),
    [
        pytest.param(["n1"], FoldResult(None),
                     r"it keeps 0 BatchNormalization nodes \(none\) but the graph has 1 \(n1\)",
                     id="a-node-nobody-reported"),
        pytest.param([], FoldResult(None, skipped=[Skipped("bn", "r", stage="onnx", node="n1")]),
                     r"it keeps 1 BatchNormalization nodes \(n1\) but the graph has 0", id="a-kept-node-not-in-graph"),
        pytest.param(["n1"], FoldResult(None, folded=[Folded("bn", "conv", stage="onnx", node="n1")],
                                        skipped=[Skipped("n1", "r", stage="onnx")]),
                     r"it reports bn folded but the graph still has them", id="a-folded-node-still-in-graph"),
    ],
)
def test_check_against_refuses_a_report_that_disagrees_with_the_graph(graph: list[str], result: FoldResult[None],
                                                                        message: str) -> None:
    with pytest.raises(VerificationFailed, match=message):
        check_against(result, _graph_with_batchnorms(*graph))


def test_rows_decided_in_pytorch_alone_are_not_graph_nodes() -> None:
    result = tag(FoldResult(None, skipped=[Skipped("input_norm", "r")]), "pytorch")
    assert check_against(result, _graph_with_batchnorms()) == 0
    with pytest.raises(VerificationFailed):
        check_against(result, _graph_with_batchnorms("input_norm"))
