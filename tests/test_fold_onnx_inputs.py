"""bnfold.fold_onnx and graph inputs backed by initializers.

IR >= 4: an initializer also listed in ``graph.input`` is a default a caller can override, so a BN
whose layer weight/bias or own parameter is such an input stays, with a reason, and the caller's
input keeps working. IR < 4: every initializer must be listed as a graph input; those fold as
constants, and the result lists every initializer (new ones included) and no removed one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from test_fold_onnx import (
    Case,
    Net,
    check_fold,
    conv_after,
    conv_before,
    count_bns,
    gemm_after,
    gemm_before,
    matmul_after,
    ort_run,
    reference,
)

from bnfold.fold_onnx import fold_onnx
from bnfold.tolerance import Tolerance


def list_as_inputs(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    """List the initializers ``names`` (default: all) as graph inputs too, with their type and shape."""
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer if names is None or t.name in names)
    return model


def data_feeds(n: Net, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Random values for the graph inputs that have no initializer behind them."""
    backed = {t.name for t in model.graph.initializer}
    return {k: v for k, v in n.feeds(model).items() if k not in backed}


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    cmp = Tolerance().compare(got, want)
    assert cmp.passed, f"{what}: {cmp}"


# -- IR < 4: every initializer is a graph input, and they fold as constants ----------------------


def ir3(build: Case, opset: int) -> Callable[[Net], tuple[onnx.ModelProto, int]]:
    """``build``'s model as an IR 3 model of ``opset``: every initializer also listed as a graph input."""

    def make(n: Net) -> tuple[onnx.ModelProto, int]:
        model, nodes_left = build(n)
        model.ir_version = 3
        model.opset_import[0].version = opset
        return list_as_inputs(model), nodes_left

    return make


def shared_weight(n: Net) -> tuple[onnx.ModelProto, int]:
    """The weight stays (the second Conv reads it), so its graph input must stay too."""
    w = n.rand("w", 3, 2, 3, 3)
    n.bn(n.node("Conv", ["x", w], "y1"), 3, "z1")
    n.node("Conv", ["x", w], "y2")
    return n.model({"x": (1, 2, 5, 5)}, ["z1", "y2"]), 2


IR3_CASES = [
    pytest.param(ir3(conv_after(2), 7), id="conv-bn-opset7"),
    pytest.param(ir3(conv_after(2, bias=False), 8), id="conv-no-bias-new-initializer-opset8"),
    pytest.param(ir3(conv_after(2, pads=[1, 1, 1, 1]), 9), id="conv-bn-opset9"),
    pytest.param(ir3(gemm_after(), 9), id="gemm-bn-opset9"),
    pytest.param(ir3(gemm_after(c_shape=(1,), beta=0.5), 9), id="gemm-c-scalar-changes-shape-opset9"),
    pytest.param(ir3(matmul_after(), 9), id="matmul-new-add-opset9"),
    pytest.param(ir3(conv_before(), 9), id="bn-conv-opset9"),
    pytest.param(ir3(gemm_before(), 9), id="bn-gemm-opset9"),
    pytest.param(ir3(shared_weight, 9), id="shared-weight-opset9"),
]


@pytest.mark.parametrize("build", IR3_CASES)
def test_ir3_folds_and_lists_every_initializer_as_an_input(build: Callable[[Net], tuple[onnx.ModelProto, int]]
                                                           ) -> None:
    """Regression: the folded IR 3 model failed the checker ("w_bnfold in initializer but not in graph
    input"): new initializers were not listed as graph inputs."""
    n = Net()
    model, nodes_left = build(n)
    onnx.checker.check_model(model, full_check=True)  # the case itself is a valid IR 3 model
    before = model.SerializeToString()
    result = fold_onnx(model)
    assert model.SerializeToString() == before, "the input model was modified"
    assert len(result.folded) == 1 and not result.skipped, result.skipped
    assert count_bns(result.model) == 0
    assert len(result.model.graph.node) == nodes_left, [nd.op_type for nd in result.model.graph.node]
    onnx.checker.check_model(result.model, full_check=True)
    g = result.model.graph
    inits = {t.name: t for t in g.initializer}
    data = [(i.name, i.type) for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert [(i.name, i.type) for i in g.input if i.name not in inits] == data  # the caller's inputs, unchanged
    listed = {i.name: i.type.tensor_type for i in g.input if i.name in inits}
    assert sorted(listed) == sorted(inits)  # every initializer listed, and no input of a removed one
    for name, tensor_type in listed.items():
        assert tensor_type.elem_type == inits[name].data_type, name
        assert [d.dim_value for d in tensor_type.shape.dim] == list(inits[name].dims), name
    assert any(note.startswith("IR version 3 lists every initializer as a graph input") for note in result.notes)
    feeds = data_feeds(n, model)
    ref = reference(model, feeds)
    for got, want, exact in zip(ort_run(result.model, feeds), ort_run(model, feeds), ref, strict=True):
        assert_close(got, want, "folded vs original (onnxruntime)")
        assert_close(got, exact, "folded (onnxruntime) vs float64 reference")


def test_ir3_initializer_inputs_stay_constants_for_onnxruntime() -> None:
    """Why IR < 4 initializers fold: onnxruntime does not let a caller feed them (no overridable
    initializers, only 'x' is an input), before the fold and after it. The untouched 'keep' stays listed."""
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z")
    n.node("Add", ["z", n.rand("keep", 1, 3, 1, 1)], "out")
    model = n.model({"x": (1, 2, 5, 5)}, ["out"])
    model.ir_version = 3
    model = list_as_inputs(model)
    result = fold_onnx(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == ["x", "keep", "w_bnfold", "y_bias_bnfold"]
    assert "(w, z.B, z.mean, z.scale, z.var)" in result.notes[0]
    for m in (model, result.model):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["x"]
        assert session.get_overridable_initializers() == []


# -- IR >= 4: an initializer that is also a graph input is not a constant ------------------------


def conv_bn(n: Net) -> onnx.ModelProto:
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3), n.rand("b", 3)], "y"), 3, "z")
    return n.model({"x": (1, 2, 5, 5)}, ["z"])


def conv_bn_identity_weight(n: Net) -> onnx.ModelProto:
    w = n.node("Identity", [n.rand("w", 3, 2, 3, 3)], "w_id")
    n.bn(n.node("Conv", ["x", w], "y"), 3, "z")
    return n.model({"x": (1, 2, 5, 5)}, ["z"])


def bn_gemm(n: Net) -> onnx.ModelProto:
    n.node("Gemm", [n.bn("x", 4, "xb"), n.rand("w", 4, 5), n.rand("c", 5)], "y")
    return n.model({"x": (3, 4)}, ["y"])


def matmul_bn(n: Net) -> onnx.ModelProto:
    n.bn(n.node("MatMul", ["x", n.rand("w", 4, 5)], "y"), 5, "z")
    return n.model({"x": (3, 4)}, ["z"])


OVERRIDABLE = "is a graph input, so a caller can override its initializer at run time: it is not a constant"

OVERRIDES = [
    pytest.param(conv_bn, ["w"], "weight 'w' of Conv 'y'", id="conv-weight"),
    pytest.param(conv_bn, ["b"], "bias 'b' of Conv 'y'", id="conv-bias"),
    pytest.param(conv_bn, ["z.scale"], "batch norm scale 'z.scale'", id="bn-scale"),
    pytest.param(conv_bn, ["z.B"], "batch norm B 'z.B'", id="bn-shift"),
    pytest.param(conv_bn, ["z.mean"], "batch norm input_mean 'z.mean'", id="bn-mean"),
    pytest.param(conv_bn, ["z.var"], "batch norm input_var 'z.var'", id="bn-var"),
    pytest.param(conv_bn, None, "batch norm scale 'z.scale'", id="keep-initializers-as-inputs-export"),
    pytest.param(conv_bn_identity_weight, ["w"], "weight 'w' of Conv 'y'", id="identity-over-weight"),
    pytest.param(bn_gemm, ["w"], "weight 'w' of Gemm 'y'", id="bn-before-gemm-weight"),
    pytest.param(bn_gemm, ["c"], "C 'c' of Gemm 'y'", id="bn-before-gemm-c"),
    pytest.param(matmul_bn, ["w"], "weight 'w' of MatMul 'y'", id="matmul-weight"),
]


@pytest.mark.parametrize(("build", "listed", "subject"), OVERRIDES)
def test_overridable_initializer_keeps_the_bn_with_reason(
    build: Callable[[Net], onnx.ModelProto], listed: list[str] | None, subject: str
) -> None:
    """Regression: the fold baked the default into the folded weight and deleted the graph input, so a
    caller feeding it got INVALID_ARGUMENT: Invalid input name."""
    n = Net(seed=2)
    model = list_as_inputs(build(n), listed)
    result = fold_onnx(model)
    assert result.folded == [] and len(result.skipped) == 1
    assert re.search(re.escape(f"{subject} {OVERRIDABLE}"), result.skipped[0].reason), result.skipped[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()  # nothing touched
    onnx.checker.check_model(result.model, full_check=True)


def test_caller_can_still_feed_an_overridable_weight() -> None:
    n = Net()
    model = list_as_inputs(conv_bn(n), ["w"])
    result = fold_onnx(model)
    x = n.rng.normal(size=(1, 2, 5, 5)).astype(np.float32)
    feeds = {"x": x, "w": n.rng.normal(size=(3, 2, 3, 3)).astype(np.float32)}
    overridden = ort_run(result.model, feeds)[0]
    assert_close(overridden, ort_run(model, feeds)[0], "with 'w' overridden")
    assert not Tolerance().compare(overridden, ort_run(result.model, {"x": x})[0]).passed  # the override took effect


def test_unrelated_overridable_initializer_stays_an_input_and_the_bn_folds() -> None:
    """Only the tensors a fold reads must be constants: 'keep' stays a working graph input."""
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z")
    n.node("Add", ["z", n.rand("keep", 1, 3, 1, 1)], "out")
    model = list_as_inputs(n.model({"x": (1, 2, 5, 5)}, ["out"]), ["keep"])
    feeds = {"x": n.rng.normal(size=(1, 2, 5, 5)).astype(np.float32),
             "keep": np.full((1, 3, 1, 1), -3.0, np.float32)}
    # check_fold also asserts the graph inputs are unchanged; the numpy reference ignores overrides
    result = check_fold(model, feeds, folded=1, bns_left=0, nodes_left=2, numpy_reference=False)
    assert result.notes == []
