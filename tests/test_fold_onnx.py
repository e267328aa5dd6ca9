"""bnfold.fold_onnx: every fold is checked four ways (how many folded, which nodes remain, outputs
equal to the original under onnxruntime with optimizations disabled and against a float64 numpy
reference, and the full ONNX checker), and every refusal has its own negative test. No torch."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold_onnx import fold_onnx
from bnfold.result import FoldResult
from bnfold.tolerance import Tolerance

NEWEST_BN_OPSET = max(
    s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == "BatchNormalization"
)
NEWEST_OPSET = onnx.defs.onnx_opset_version()
IR_VERSION = 10  # what onnxruntime 1.17+ loads; onnx.helper would stamp a newer one


# -- building models inline -------------------------------------------------------------------


class Net:
    """Accumulates nodes and initializers of a test graph; random but non-trivial BN statistics."""

    def __init__(self, seed: int = 0, dtype: Any = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: Any) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(self.dtype), name))
        return name

    def rand(self, name: str, *shape: int) -> str:
        return self.const(name, self.rng.normal(size=shape))

    def node(self, op: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def bn(self, x: str, c: int, out: str, eps: float = 1e-3, **attrs: Any) -> str:
        r = self.rng
        params = [
            self.const(f"{out}.scale", r.uniform(0.5, 2.0, c) * r.choice([-1, 1], c)),
            self.const(f"{out}.B", r.normal(size=c)),
            self.const(f"{out}.mean", r.normal(size=c)),
            self.const(f"{out}.var", r.uniform(0.2, 3.0, c)),
        ]
        return self.node("BatchNormalization", [x, *params], out, name=f"{out}_node", epsilon=eps, **attrs)

    def model(self, inputs: dict[str, tuple[int, ...]], outputs: list[str], opset: int = 15,
              shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
        """``shapes`` gives output shapes shape inference cannot work out."""
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, elem, (shapes or {}).get(n)) for n in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
        if not shapes:
            inferred = onnx.shape_inference.infer_shapes(model)
            del model.graph.output[:]
            model.graph.output.extend(inferred.graph.output)
        return model

    def feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        out = {}
        for vi in model.graph.input:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            out[vi.name] = self.rng.normal(size=shape).astype(self.dtype)
        return out


# -- running models ---------------------------------------------------------------------------


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ints(attrs: dict[str, Any], name: str, default: list[int]) -> list[int]:
    return list(attrs.get(name, default))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: dict[str, Any]) -> np.ndarray:
    nd, group = x.ndim - 2, attrs.get("group", 1)
    assert attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"), "reference handles explicit pads only"
    strides, dil = _ints(attrs, "strides", [1] * nd), _ints(attrs, "dilations", [1] * nd)
    pads = _ints(attrs, "pads", [0] * 2 * nd)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    window = [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(nd)]
    v = sliding_window_view(x, window, axis=tuple(range(2, 2 + nd)))
    v = v[(slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dil))]
    cg, mg = w.shape[1], w.shape[0] // group
    axes = ([1, *range(2 + nd, 2 + 2 * nd)], [1, *range(2, 2 + nd)])
    y = np.concatenate(
        [np.tensordot(v[:, i * cg:(i + 1) * cg], w[i * mg:(i + 1) * mg], axes=axes) for i in range(group)], axis=-1
    )
    y = np.moveaxis(y, -1, 1)
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


def _conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: dict[str, Any]) -> np.ndarray:
    nd, group = x.ndim - 2, attrs.get("group", 1)
    strides, dil = _ints(attrs, "strides", [1] * nd), _ints(attrs, "dilations", [1] * nd)
    pads, out_pad = _ints(attrs, "pads", [0] * 2 * nd), _ints(attrs, "output_padding", [0] * nd)
    size = [(x.shape[2 + i] - 1) * strides[i] + (w.shape[2 + i] - 1) * dil[i] + 1 + out_pad[i] for i in range(nd)]
    cg, mg = x.shape[1] // group, w.shape[1]
    y = np.zeros((x.shape[0], mg * group, *size))
    for tap in itertools.product(*(range(k) for k in w.shape[2:])):
        where = tuple(slice(t * d, t * d + (n - 1) * s + 1, s)
                      for t, d, s, n in zip(tap, dil, strides, x.shape[2:], strict=True))
        for i in range(group):
            part = np.tensordot(x[:, i * cg:(i + 1) * cg], w[i * cg:(i + 1) * cg][(..., *tap)], axes=([1], [0]))
            y[(slice(None), slice(i * mg, (i + 1) * mg), *where)] += np.moveaxis(part, -1, 1)
    y = y[(slice(None), slice(None), *(slice(pads[i], size[i] - pads[i + nd]) for i in range(nd)))]
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


def reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate the graph in float64 with numpy, independent of bnfold.arith and onnxruntime."""
    env = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    env.update({t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer})
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        ins = [env[n] if n else None for n in node.input]
        op = node.op_type
        if op == "Constant":
            y = numpy_helper.to_array(a["value"]).astype(np.float64)
        elif op == "Conv":
            y = _conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
        elif op == "ConvTranspose":
            y = _conv_transpose(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
        elif op == "BatchNormalization":
            x, s, bias, mean, var = ins
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
            y = y * s.reshape(shape) + bias.reshape(shape)
        elif op == "Gemm":
            A = ins[0].T if a.get("transA", 0) else ins[0]
            B = ins[1].T if a.get("transB", 0) else ins[1]
            y = a.get("alpha", 1.0) * A @ B
            if len(ins) > 2 and ins[2] is not None:
                y = y + a.get("beta", 1.0) * ins[2]
        elif op == "MatMul":
            y = ins[0] @ ins[1]
        elif op == "Add":
            y = ins[0] + ins[1]
        elif op == "Relu":
            y = np.maximum(ins[0], 0)
        elif op == "GlobalAveragePool":
            y = ins[0].mean(axis=tuple(range(2, ins[0].ndim)), keepdims=True)
        elif op == "Flatten":
            y = ins[0].reshape(ins[0].shape[0], -1)
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = y
    return [env[o.name] for o in model.graph.output]


@functools.cache
def ort_supports(opset: int) -> bool:
    """Whether onnxruntime loads models stamped with this opset (newer ones may be unreleased)."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    try:
        ort_run(model, {"x": np.zeros(1, np.float32)})
    except Exception:
        return False
    return True


def count_bns(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def check_fold(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    folded: int,
    bns_left: int,
    nodes_left: int,
    numpy_reference: bool = True,
    runtime: bool = True,
) -> FoldResult[onnx.ModelProto]:
    """Fold and assert the four things: counts, remaining nodes, equal outputs, checker passes."""
    before = model.SerializeToString()
    result = fold_onnx(model)
    assert model.SerializeToString() == before, "the input model was modified"
    assert len(result.folded) == folded, result.skipped
    assert len(result.folded) + len(result.skipped) == count_bns(model)
    assert count_bns(result.model) == bns_left
    assert len(result.model.graph.node) == nodes_left, [n.op_type for n in result.model.graph.node]
    onnx.checker.check_model(result.model, full_check=True)
    assert [(o.name, o.type) for o in result.model.graph.output] == [(o.name, o.type) for o in model.graph.output]
    assert [(i.name, i.type) for i in result.model.graph.input] == [(i.name, i.type) for i in model.graph.input]
    refs = reference(model, feeds) if numpy_reference else None
    expected = ort_run(model, feeds) if runtime else refs
    actual = ort_run(result.model, feeds) if runtime else reference(result.model, feeds)
    assert expected is not None and actual is not None
    refs = refs or expected
    for want, got, ref in zip(expected, actual, refs, strict=True):
        cmp = Tolerance().compare(got, want)
        assert cmp.passed, f"folded vs original (onnxruntime): {cmp}"
        cmp = Tolerance().compare(got, ref)
        assert cmp.passed, f"folded (onnxruntime) vs float64 reference: {cmp}"
    if numpy_reference:
        for got, ref in zip(reference(result.model, feeds), refs, strict=True):
            assert Tolerance().compare(got, ref).passed
    return result


# -- BN after the layer -------------------------------------------------------------------------

Case = Callable[[Net], tuple[onnx.ModelProto, int]]  # builds the model; returns it and its node count after


def conv_after(dims: int, group: int = 1, bias: bool = True, **attrs: Any) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        w = n.rand("w", 6, 12 // group, *([3] * dims))
        inputs = ["x", w, n.rand("b", 6)] if bias else ["x", w]
        n.bn(n.node("Conv", inputs, "y", group=group, **attrs), 6, "z")
        return n.model({"x": (2, 12, *([7] * dims))}, ["z"]), 1

    return build


def conv_transpose_after(group: int = 1, bias: bool = True, **attrs: Any) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        w = n.rand("w", 6, 8 // group, 3, 3)
        inputs = ["x", w, n.rand("b", 8)] if bias else ["x", w]
        n.bn(n.node("ConvTranspose", inputs, "y", group=group, **attrs), 8, "z")
        return n.model({"x": (2, 6, 5, 5)}, ["z"]), 1

    return build


def gemm_after(trans_b: int = 0, c_shape: tuple[int, ...] | None = (5,), **attrs: Any) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        w = n.rand("w", *((5, 4) if trans_b else (4, 5)))
        inputs = ["x", w] + ([n.rand("c", *c_shape)] if c_shape is not None else [])
        a_shape = (4, 3) if attrs.get("transA") else (3, 4)
        n.bn(n.node("Gemm", inputs, "y", transB=trans_b, **attrs), 5, "z")
        return n.model({"x": a_shape}, ["z"]), 1

    return build


def matmul_after(bias_shape: tuple[int, ...] | None = None, bias_first: bool = False) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        y = n.node("MatMul", ["x", n.rand("w", 4, 5)], "y")
        if bias_shape is not None:
            b = n.rand("b", *bias_shape)
            y = n.node("Add", [b, y] if bias_first else [y, b], "yb")
        n.bn(y, 5, "z")
        return n.model({"x": (3, 4)}, ["z"]), 2

    return build


AFTER_CASES = [
    pytest.param(conv_after(1), id="conv1d"),
    pytest.param(conv_after(2, pads=[1, 1, 1, 1]), id="conv2d-padded"),
    pytest.param(conv_after(3, strides=[2, 1, 2], dilations=[1, 2, 1]), id="conv3d-strided-dilated"),
    pytest.param(conv_after(2, group=3, bias=False), id="conv2d-grouped-no-bias"),
    pytest.param(conv_after(2, group=6, pads=[1, 0, 1, 0]), id="conv2d-depthwise"),
    pytest.param(conv_after(2, auto_pad="SAME_UPPER", strides=[2, 2]), id="conv2d-auto-pad-same"),
    pytest.param(conv_transpose_after(), id="convtranspose"),
    pytest.param(conv_transpose_after(group=2, bias=False, strides=[2, 2], pads=[1, 0, 1, 0]),
                 id="convtranspose-grouped"),
    pytest.param(conv_transpose_after(strides=[2, 2], output_padding=[1, 1]), id="convtranspose-output-padding"),
    pytest.param(gemm_after(), id="gemm"),
    pytest.param(gemm_after(trans_b=1, transA=1, alpha=0.7, beta=1.3), id="gemm-transposed-alpha-beta"),
    pytest.param(gemm_after(c_shape=None), id="gemm-no-c"),
    pytest.param(gemm_after(c_shape=(1,), beta=0.5), id="gemm-c-scalar"),
    pytest.param(gemm_after(c_shape=(1, 5)), id="gemm-c-row"),
    pytest.param(gemm_after(c_shape=(3, 1), trans_b=1), id="gemm-c-column"),
    pytest.param(gemm_after(c_shape=(3, 5), beta=0.0), id="gemm-c-full-beta0"),
    pytest.param(matmul_after(), id="matmul"),
    pytest.param(matmul_after((5,)), id="matmul-add"),
    pytest.param(matmul_after((1, 5), bias_first=True), id="matmul-add-bias-first"),
]


@pytest.mark.parametrize("build", AFTER_CASES)
def test_bn_after_layer_folds(build: Case) -> None:
    n = Net()
    model, nodes_left = build(n)
    numpy_ok = not any(a.name == "auto_pad" for node in model.graph.node for a in node.attribute)
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=nodes_left,
                        numpy_reference=numpy_ok)
    assert result.folded[0].side == "output"
    assert result.folded[0].into == "y"  # the layer, also for MatMul+Add


# -- BN before the layer ------------------------------------------------------------------------


def conv_before(group: int = 1, **attrs: Any) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        n.node("Conv", [n.bn("x", 6, "xb"), n.rand("w", 4, 6 // group, 3, 3), n.rand("b", 4)], "y",
               group=group, **attrs)
        return n.model({"x": (2, 6, 7, 7)}, ["y"]), 1

    return build


def conv_transpose_before(group: int = 2) -> Case:
    """Input-side ConvTranspose folds only when the shift is zero (beta == mean * scale)."""

    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        xb = n.bn("x", 6, "xb")
        for t in n.inits[-3:-1]:  # B = mean = 0 gives shift = B - mean * scale = 0 exactly; scale stays random
            t.CopyFrom(numpy_helper.from_array(np.zeros(6, n.dtype), t.name))
        n.node("ConvTranspose", [xb, n.rand("w", 6, 4 // group, 3, 3)], "y", group=group, strides=[2, 2])
        return n.model({"x": (2, 6, 4, 4)}, ["y"]), 1

    return build


def gemm_before(trans_b: int = 0, c: bool = True, **attrs: Any) -> Case:
    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        w = n.rand("w", *((5, 4) if trans_b else (4, 5)))
        n.node("Gemm", [n.bn("x", 4, "xb"), w] + ([n.rand("c", 5)] if c else []), "y", transB=trans_b, **attrs)
        return n.model({"x": (3, 4)}, ["y"]), 1

    return build


def matmul_before(bias_shape: tuple[int, ...] | None = None) -> Case:
    """Without a following Add a new one carries the shift term; with one, its bias absorbs it."""

    def build(n: Net) -> tuple[onnx.ModelProto, int]:
        y = n.node("MatMul", [n.bn("x", 4, "xb"), n.rand("w", 4, 5)], "y")
        if bias_shape is not None:
            y = n.node("Add", [n.rand("b", *bias_shape), y], "yb")
        return n.model({"x": (3, 4)}, [y]), 2

    return build


BEFORE_CASES = [
    pytest.param(conv_before(), id="conv-unpadded"),
    pytest.param(conv_before(group=2, strides=[2, 2], dilations=[2, 1]), id="conv-grouped-strided"),
    pytest.param(conv_before(auto_pad="VALID"), id="conv-auto-pad-valid"),
    pytest.param(conv_transpose_before(), id="convtranspose-zero-shift"),
    pytest.param(gemm_before(), id="gemm"),
    pytest.param(gemm_before(trans_b=1, c=False, alpha=0.6), id="gemm-transB-no-c"),
    pytest.param(gemm_before(alpha=1.5, beta=0.25), id="gemm-alpha-beta"),
    pytest.param(matmul_before(), id="matmul"),
    pytest.param(matmul_before((5,)), id="matmul-add-merged"),
    pytest.param(matmul_before((3, 1)), id="matmul-add-column-merged"),
]


@pytest.mark.parametrize("build", BEFORE_CASES)
def test_bn_before_layer_folds(build: Case) -> None:
    n = Net(seed=1)
    model, nodes_left = build(n)
    numpy_ok = not any(a.name == "auto_pad" for node in model.graph.node for a in node.attribute)
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=nodes_left,
                        numpy_reference=numpy_ok)
    assert result.folded[0].side == "input"


# -- opsets, dtypes, constants, bookkeeping -------------------------------------------------------


@pytest.mark.parametrize("opset", [
    pytest.param(7, id="opset7-spatial"), pytest.param(9, id="opset9"), pytest.param(14, id="opset14"),
    pytest.param(15, id="opset15"), pytest.param(NEWEST_OPSET, id="newest"),
])
def test_opsets(opset: int) -> None:
    n = Net()
    attrs: dict[str, Any] = {"training_mode": 0} if opset >= 14 else {}
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z", **attrs)
    model = n.model({"x": (1, 2, 5, 5)}, ["z"], opset=opset)
    check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=1, runtime=ort_supports(opset))


@pytest.mark.parametrize(("dtype", "tol"), [
    # float16: weights and arithmetic round to 2**-11 relative; allow ~4 ulps of the output scale
    pytest.param(np.float16, Tolerance(atol=0.0, rtol=2e-3), id="float16"),
    # float64: exact algebra, only float64 rounding remains
    pytest.param(np.float64, Tolerance(atol=1e-12, rtol=1e-12), id="float64"),
])
def test_dtype_is_kept(dtype: Any, tol: Tolerance) -> None:
    n = Net(dtype=dtype)
    n.bn(n.node("Gemm", ["x", n.rand("w", 4, 5), n.rand("c", 5)], "y"), 5, "z")
    model = n.model({"x": (3, 4)}, ["z"])
    result = fold_onnx(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert {t.data_type for t in result.model.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    feeds = n.feeds(model)
    ref = reference(model, feeds)[0]
    for got in (reference(result.model, feeds)[0], ort_run(result.model, feeds)[0]):
        cmp = tol.compare(got, ref)
        assert cmp.passed, cmp
    cmp = tol.compare(ort_run(result.model, feeds)[0], ort_run(model, feeds)[0])
    assert cmp.passed, cmp


def test_bfloat16_is_kept() -> None:
    """onnxruntime has no bfloat16 Gemm on CPU, so the numbers are checked with the numpy reference:
    bfloat16 keeps 8 significant bits (2**-9 relative rounding); allow ~4 ulps of the output scale."""
    n = Net(dtype=helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
    n.bn(n.node("Gemm", ["x", n.rand("w", 4, 5), n.rand("c", 5)], "y"), 5, "z")
    model = n.model({"x": (3, 4)}, ["z"])
    result = fold_onnx(model)
    assert len(result.folded) == 1
    onnx.checker.check_model(result.model, full_check=True)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.BFLOAT16}
    feeds = n.feeds(model)
    cmp = Tolerance(atol=0.0, rtol=1.6e-2).compare(reference(result.model, feeds)[0], reference(model, feeds)[0])
    assert cmp.passed, cmp


def test_constant_node_weights_and_bn_params() -> None:
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3), n.rand("b", 3)], "y"), 3, "z")
    for t in list(n.inits):  # every initializer becomes a Constant node
        n.nodes.insert(0, helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    n.inits.clear()
    model = n.model({"x": (1, 2, 5, 5)}, ["z"])
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=1)
    assert [node.op_type for node in result.model.graph.node] == ["Conv"]  # dead Constants removed


def test_identity_wrapped_weights_and_bn_params() -> None:
    """torch.onnx without constant folding reads every initializer through an Identity node."""
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3), n.rand("b", 3)], "y"), 3, "z")
    identities = []
    for node in n.nodes:
        for j in range(1, len(node.input)):
            name = node.input[j]
            identities.append(helper.make_node("Identity", [name], [f"{name}_id"], name=f"id_{name}"))
            node.input[j] = f"{name}_id"
    n.nodes[:0] = identities
    model = n.model({"x": (1, 2, 5, 5)}, ["z"])
    assert sum(node.op_type == "Identity" for node in model.graph.node) == 6
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=1, numpy_reference=False)
    assert [node.op_type for node in result.model.graph.node] == ["Conv"]  # dead Identities removed
    assert len(result.model.graph.initializer) == 2  # only the folded weight and bias remain


def test_value_float_constants() -> None:
    n = Net()
    n.node("Gemm", ["x", n.rand("w", 2, 1)], "y")
    for name, v in [("s", 1.5), ("b", -0.5), ("m", 0.25), ("v", 2.0)]:
        n.nodes.insert(0, helper.make_node("Constant", [], [name], name=f"c_{name}", value_floats=[v]))
    n.node("BatchNormalization", ["y", "s", "b", "m", "v"], "z")
    model = n.model({"x": (3, 2)}, ["z"])
    check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=1, numpy_reference=False)


def test_unused_initializers_removed_and_model_metadata_kept() -> None:
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z")
    n.rand("unrelated_unused", 2)  # not ours to remove
    model = n.model({"x": (1, 2, 5, 5)}, ["z"], opset=14)
    model.producer_name, model.producer_version, model.model_version = "trainer", "9.9", 7
    helper.set_model_props(model, {"author": "me", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = fold_onnx(model).model
    assert sorted(t.name for t in result.graph.initializer) == ["unrelated_unused", "w", "y_bias_bnfold"]
    assert (result.producer_name, result.producer_version, result.model_version) == ("trainer", "9.9", 7)
    assert {p.key: p.value for p in result.metadata_props} == {"author": "me", "license": "MIT"}
    assert list(result.opset_import) == list(model.opset_import)
    assert result.ir_version == model.ir_version


def test_new_names_do_not_collide() -> None:
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y", name="c"), 3, "z")
    n.rand("c_bias_bnfold", 3)  # the name the new bias would take
    n.node("Add", ["z", "c_bias_bnfold_1"], "out", name="c_bias_bnfold_2")
    n.rand("c_bias_bnfold_1", 1, 3, 1, 1)
    model = n.model({"x": (1, 2, 5, 5)}, ["out"])
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=2)
    names = [t.name for t in result.model.graph.initializer] + [o for nd in result.model.graph.node for o in nd.output]
    assert len(names) == len(set(names))
    assert "c_bias_bnfold_3" in names


def test_shared_weight_gets_a_private_copy() -> None:
    n = Net()
    w = n.rand("w", 3, 2, 3, 3)
    n.bn(n.node("Conv", ["x", w], "y1"), 3, "z1")
    n.node("Conv", ["x", w], "y2")  # same weight, no BN: must keep computing x * w
    model = n.model({"x": (1, 2, 5, 5)}, ["z1", "y2"])
    result = check_fold(model, n.feeds(model), folded=1, bns_left=0, nodes_left=2)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(weights["w"], numpy_helper.to_array(model.graph.initializer[0]))
    assert result.model.graph.node[0].input[1] == "w_bnfold"


def test_chained_bns_both_fold() -> None:
    n = Net()
    n.bn(n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z1"), 3, "z2")
    model = n.model({"x": (1, 2, 5, 5)}, ["z2"])
    check_fold(model, n.feeds(model), folded=2, bns_left=0, nodes_left=1)


def test_resnet_block_with_gemm_head_folds_every_bn() -> None:
    """stem conv-bn-relu, a residual block (conv-bn-relu-conv-bn + identity, relu), a 1x1
    projection branch with its own BN, global pooling, and a BN1d before a Gemm head."""
    n = Net(seed=3)
    h = n.node("Relu", [n.bn(n.node("Conv", ["x", n.rand("stem.w", 8, 3, 3, 3)], "stem", pads=[1] * 4), 8, "stem.bn")],
               "stem.relu")
    a = n.node("Relu", [n.bn(n.node("Conv", [h, n.rand("b1.w", 8, 8, 3, 3)], "b1.c1", pads=[1] * 4), 8, "b1.bn1")],
               "b1.relu1")
    a = n.bn(n.node("Conv", [a, n.rand("b1.w2", 8, 8, 3, 3)], "b1.c2", pads=[1] * 4), 8, "b1.bn2")
    h = n.node("Relu", [n.node("Add", [a, h], "b1.add")], "b1.out")
    a = n.node("Relu", [n.bn(n.node("Conv", [h, n.rand("b2.w", 16, 8, 3, 3)], "b2.c1", pads=[1] * 4, strides=[2, 2]),
                             16, "b2.bn1")], "b2.relu1")
    a = n.bn(n.node("Conv", [a, n.rand("b2.w2", 16, 16, 3, 3)], "b2.c2", pads=[1] * 4), 16, "b2.bn2")
    p = n.bn(n.node("Conv", [h, n.rand("b2.proj.w", 16, 8, 1, 1)], "b2.proj", strides=[2, 2]), 16, "b2.bnp")
    h = n.node("Relu", [n.node("Add", [a, p], "b2.add")], "b2.out")
    h = n.node("Flatten", [n.node("GlobalAveragePool", [h], "pool")], "flat")
    n.node("Gemm", [n.bn(h, 16, "head.bn"), n.rand("fc.w", 10, 16), n.rand("fc.b", 10)], "logits", transB=1)
    model = onnx.shape_inference.infer_shapes(n.model({"x": (2, 3, 16, 16)}, ["logits"]))  # with value_info
    result = check_fold(model, n.feeds(model), folded=7, bns_left=0, nodes_left=len(model.graph.node) - 7)
    assert {f.side for f in result.folded} == {"output", "input"}
    assert result.skipped == []


# -- refusals: the BN stays, with a reason naming the actual values -------------------------------

Refusal = Callable[[Net], onnx.ModelProto]


def _conv_bn(n: Net, **bn_attrs: Any) -> None:
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 3, "z", **bn_attrs)


def refuse_second_consumer(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    n.node("Relu", ["y"], "r")
    return n.model({"x": (1, 2, 5, 5)}, ["z", "r"])


def refuse_layer_output_is_graph_output(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    return n.model({"x": (1, 2, 5, 5)}, ["z", "y"])


def refuse_relu_between(n: Net) -> onnx.ModelProto:
    n.bn(n.node("Relu", [n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y")], "r"), 3, "z")
    n.node("Relu", ["z"], "out")
    return n.model({"x": (1, 2, 5, 5)}, ["out"])


def refuse_param_graph_input(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    n.inits = [t for t in n.inits if t.name != "z.mean"]
    return n.model({"x": (1, 2, 5, 5), "z.mean": (3,)}, ["z"])


def refuse_param_computed(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    bn = n.nodes[-1]
    bn.input[1] = n.node("Abs", ["z.scale"], "z.scale.abs")
    n.nodes.insert(0, n.nodes.pop())  # keep topological order
    return n.model({"x": (1, 2, 5, 5)}, ["z"])


def refuse_weight_graph_input(n: Net) -> onnx.ModelProto:
    n.bn(n.node("Conv", ["x", "w"], "y"), 3, "z")
    return n.model({"x": (1, 2, 5, 5), "w": (3, 2, 3, 3)}, ["z"])


def refuse_matmul_rank3(n: Net) -> onnx.ModelProto:
    n.bn(n.node("MatMul", ["x", n.rand("w", 6, 4)], "y"), 5, "z")
    return n.model({"x": (2, 5, 6)}, ["z"])


def refuse_matmul_rank3_before(n: Net) -> onnx.ModelProto:
    n.node("MatMul", [n.bn("x", 5, "xb"), n.rand("w", 6, 4)], "y")
    return n.model({"x": (2, 5, 6)}, ["y"])


def refuse_conv_zero_padding_before(n: Net) -> onnx.ModelProto:
    n.node("Conv", [n.bn("x", 2, "xb"), n.rand("w", 3, 2, 3, 3)], "y", pads=[1, 1, 1, 1])
    return n.model({"x": (1, 2, 5, 5)}, ["y"])


def refuse_conv_same_padding_before(n: Net) -> onnx.ModelProto:
    n.node("Conv", [n.bn("x", 2, "xb"), n.rand("w", 3, 2, 3, 3)], "y", auto_pad="SAME_LOWER")
    return n.model({"x": (1, 2, 5, 5)}, ["y"])


def refuse_conv_transpose_shift_before(n: Net) -> onnx.ModelProto:
    n.node("ConvTranspose", [n.bn("x", 2, "xb"), n.rand("w", 2, 3, 3, 3)], "y")
    return n.model({"x": (1, 2, 5, 5)}, ["y"])


def refuse_gemm_trans_a_before(n: Net) -> onnx.ModelProto:
    n.node("Gemm", [n.bn("x", 3, "xb"), n.rand("w", 4, 5)], "y", transA=1)
    return n.model({"x": (4, 3)}, ["y"])


def refuse_training_mode(n: Net) -> onnx.ModelProto:
    _conv_bn(n, training_mode=1)
    n.nodes[-1].output.extend(["z.running_mean", "z.running_var"])  # the schema requires all three here
    return n.model({"x": (1, 2, 5, 5)}, ["z"], shapes={"z": (1, 3, 3, 3)})


def refuse_second_output_used(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    n.nodes[-1].output.extend(["z.running_mean", "z.running_var", "z.saved_mean", "z.saved_var"])
    return n.model({"x": (1, 2, 5, 5)}, ["z", "z.running_mean"], opset=9,
                   shapes={"z": (1, 3, 3, 3), "z.running_mean": (3,)})


def refuse_opset9_statistics_outputs(n: Net) -> onnx.ModelProto:
    """Regression: before opset 14, statistics outputs (even unused) mean training mode; such BNs (e.g. from
    torch.onnx.export(training=TrainingMode.PRESERVE) of a train-mode model) were folded with the running
    statistics, a different function from what onnxruntime computes."""
    _conv_bn(n)
    n.nodes[-1].output.extend(["z.running_mean", "z.running_var", "z.saved_mean", "z.saved_var"])
    return n.model({"x": (2, 2, 5, 5)}, ["z"], opset=9, shapes={"z": (2, 3, 3, 3)})


def refuse_spatial0(n: Net) -> onnx.ModelProto:
    _conv_bn(n, spatial=0)
    return n.model({"x": (1, 2, 5, 5)}, ["z"], opset=7)


def refuse_opset6(n: Net) -> onnx.ModelProto:
    _conv_bn(n, is_test=1)
    return n.model({"x": (1, 2, 5, 5)}, ["z"], opset=6)


def refuse_negative_variance(n: Net) -> onnx.ModelProto:
    _conv_bn(n)
    n.inits[-1].CopyFrom(numpy_helper.from_array(np.array([1.0, -5.0, 1.0], np.float32), "z.var"))
    return n.model({"x": (1, 2, 5, 5)}, ["z"])


def refuse_no_layer_either_side(n: Net) -> onnx.ModelProto:
    n.node("Relu", [n.bn("x", 2, "xb")], "y")
    return n.model({"x": (1, 2, 5, 5)}, ["y"])


def refuse_bn_feeds_weight(n: Net) -> onnx.ModelProto:
    n.node("MatMul", ["x", n.bn("w_in", 4, "wb")], "y")
    return n.model({"x": (3, 4), "w_in": (4, 4)}, ["y"])


REFUSALS = [
    pytest.param(refuse_second_consumer, r"output 'y' has 2 uses \(BatchNormalization 'z_node', Relu 'r'\)",
                 id="layer-output-second-consumer"),
    pytest.param(refuse_layer_output_is_graph_output, "output 'y' is a graph output",
                 id="layer-output-graph-output"),
    pytest.param(refuse_relu_between, "input comes from Relu 'r'.*output goes to Relu 'out'", id="relu-between"),
    pytest.param(refuse_param_graph_input, "batch norm input_mean 'z.mean' is a graph input",
                 id="bn-param-graph-input"),
    pytest.param(refuse_param_computed, "batch norm scale 'z.scale.abs' is computed by Abs", id="bn-param-computed"),
    pytest.param(refuse_weight_graph_input, "weight 'w' of Conv 'y' is a graph input", id="dynamic-weight"),
    pytest.param(refuse_matmul_rank3, r"output of MatMul 'y' \('y'\) has rank 3", id="matmul-rank3-after"),
    pytest.param(refuse_matmul_rank3_before, r"batch norm input \('x'\) has rank 3", id="matmul-rank3-before"),
    pytest.param(refuse_conv_zero_padding_before, r"zero padding \(1, 1, 1, 1\)", id="conv-zero-padding-before"),
    pytest.param(refuse_conv_same_padding_before, "auto_pad=SAME_LOWER", id="conv-auto-pad-same-before"),
    pytest.param(refuse_conv_transpose_shift_before, "following transposed convolution is not exact",
                 id="convtranspose-shift-before"),
    pytest.param(refuse_gemm_trans_a_before, "Gemm 'y' has transA=1", id="gemm-transA-before"),
    pytest.param(refuse_training_mode, "training_mode=1", id="training-mode"),
    pytest.param(refuse_second_output_used, "running-statistics output 'z.running_mean' is used",
                 id="second-output-used"),
    pytest.param(refuse_opset9_statistics_outputs, "in opset 9 a BatchNormalization with statistics outputs",
                 id="opset9-statistics-outputs-training"),
    pytest.param(refuse_spatial0, "spatial=0", id="opset7-spatial0"),
    pytest.param(refuse_opset6, "opset 6", id="opset6"),
    pytest.param(refuse_negative_variance, r"var \+ eps must be > 0, got .*-4.99.* at channel 1",
                 id="negative-variance"),
    pytest.param(refuse_no_layer_either_side, "input 'x' is not computed by a layer.*goes to Relu 'y'",
                 id="no-layer-either-side"),
    pytest.param(refuse_bn_feeds_weight, "feeds the weight input of MatMul 'y'", id="bn-feeds-weight"),
]


@pytest.mark.parametrize(("build", "match"), REFUSALS)
def test_refusal_keeps_bn_with_reason(build: Refusal, match: str) -> None:
    n = Net(seed=2)
    model = build(n)
    result = fold_onnx(model)
    assert result.folded == []
    assert len(result.skipped) == 1
    assert re.search(match, result.skipped[0].reason), result.skipped[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()  # nothing touched
    onnx.checker.check_model(result.model, full_check=True)


def test_channel_count_mismatch_is_refused() -> None:
    """Not a valid model (so no runtime check), but the fold must refuse rather than raise."""
    n = Net()
    n.bn(n.node("Conv", ["x", n.rand("w", 3, 2, 3, 3)], "y"), 4, "z")
    graph = helper.make_graph(n.nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 3, 3])], n.inits)
    result = fold_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    assert result.folded == []
    assert "Conv 'y' has 3 output channels but the batch norm has 4" in result.skipped[0].reason


def test_bn_inside_subgraph_is_reported_not_folded() -> None:
    body = Net(seed=4)
    body.bn(body.node("Conv", ["x", body.rand("w", 3, 2, 3, 3)], "y"), 3, "z")
    branch = helper.make_graph(body.nodes, "then", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                               body.inits)
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["xi"])], "else", [],
                              [helper.make_tensor_value_info("xi", TensorProto.FLOAT, None)])
    n = Net()
    n.node("If", ["cond"], "out", name="branch", then_branch=branch, else_branch=other)
    n.bn(n.node("Conv", ["x", n.rand("w0", 3, 2, 3, 3)], "y0"), 3, "z0")
    graph = helper.make_graph(
        n.nodes, "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z0", TensorProto.FLOAT, [1, 3, 3, 3])], n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=IR_VERSION)
    result = fold_onnx(model)
    assert [f.bn for f in result.folded] == ["z0_node"]
    assert [s.bn for s in result.skipped] == ["z_node"]
    assert "inside a subgraph of If 'branch'" in result.skipped[0].reason
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 5)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        for got, want in zip(ort_run(result.model, feeds), ort_run(model, feeds), strict=True):
            assert Tolerance().compare(got, want).passed


def test_rejects_non_model() -> None:
    with pytest.raises(TypeError, match=r"expects an onnx\.ModelProto, got GraphProto"):
        fold_onnx(onnx.GraphProto())  # type: ignore[arg-type]


def test_dispatch_from_package_fold() -> None:
    import bnfold

    n = Net()
    _conv_bn(n)
    assert len(bnfold.fold(n.model({"x": (1, 2, 5, 5)}, ["z"])).folded) == 1


def test_long_chain_of_blocks_folds_every_bn() -> None:
    """Many rewrites in one pass: the index stays consistent without rebuilding between them."""
    n = Net(seed=5)
    h = "x"
    for i in range(40):
        conv = n.node("Conv", [h, n.rand(f"w{i}", 4, 4, 1, 1)], f"c{i}")
        h = n.node("Relu", [n.bn(conv, 4, f"b{i}")], f"r{i}")
    model = n.model({"x": (1, 4, 3, 3)}, [h])
    result = check_fold(model, n.feeds(model), folded=40, bns_left=0, nodes_left=80)
    assert len(result.model.graph.initializer) == 80  # 40 weights + 40 new biases, no BN parameters


def test_bn_inside_model_local_function_is_reported_not_folded() -> None:
    """Regression: a BN inside a model-local function (FunctionProto) was in neither folded nor skipped."""
    n = Net()
    body = [helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="fbn")]
    function = helper.make_function("local", "ConvBn", ["x", "w", "g", "b", "m", "v"], ["y"], body,
                                    [helper.make_opsetid("", 17)])
    params = [n.rand("w", 4, 3, 3, 3), n.rand("g", 4), n.rand("b", 4), n.rand("m", 4), n.const("v", np.ones(4))]
    n.nodes.append(helper.make_node("ConvBn", ["x", *params], ["y"], domain="local", name="call"))
    model = n.model({"x": (1, 3, 8, 8)}, ["y"], opset=17, shapes={"y": (1, 4, 6, 6)})
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(function)
    result = fold_onnx(model)
    assert result.folded == [] and [s.bn for s in result.skipped] == ["fbn"]
    assert "model-local function 'local.ConvBn'" in result.skipped[0].reason
    onnx.checker.check_model(result.model, full_check=True)
