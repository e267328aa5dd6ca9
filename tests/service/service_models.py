"""ONNX test models built inline with onnx.helper (no torch), and a repository of them.

A uniquely named module (not conftest) so test modules can import it without clashing with other
test directories' conftest modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.certificate import Certificate, attach

OPSET = [helper.make_opsetid("", 17)]
LABELS = ["cat", "dog", "bird"]
TYPES = {  # protocol datatype -> (onnx element type, numpy dtype)
    "BOOL": (TensorProto.BOOL, np.bool_), "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16), "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64), "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16), "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64), "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32), "FP64": (TensorProto.DOUBLE, np.float64),
}


def gemm_weights(seed: int, features: int = 4, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((classes, features)).astype(np.float32), rng.standard_normal(classes).astype(np.float32)


def gemm_model(seed: int, features: int = 4, classes: int = 3, batch: int | str = "N") -> onnx.ModelProto:
    """logits = input @ W.T + b with a dynamic (or fixed) batch dimension."""
    w, b = gemm_weights(seed, features, classes)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["logits"], transB=1)], "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=10)
    onnx.checker.check_model(model)
    return model


def gemm_reference(seed: int, x: np.ndarray) -> np.ndarray:
    """The Gemm model's output computed in float64."""
    w, b = gemm_weights(seed, x.shape[1])
    return x.astype(np.float64) @ w.T.astype(np.float64) + b.astype(np.float64)


def certified(model: onnx.ModelProto, seed: int, tamper: float = 0.0) -> onnx.ModelProto:
    x = np.random.default_rng(100 + seed).standard_normal((2, 4)).astype(np.float32)
    cert = Certificate(input_name="input", output_name="logits", selftest_input=x,
                       selftest_output=(gemm_reference(seed, x) + tamper).astype(np.float32),
                       class_labels=LABELS, architecture="gemm-test", folded=1)
    attach(model, cert)
    return model


def conv_model() -> onnx.ModelProto:
    """input [N,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits [N,5]."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "CW"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "CB"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "FW"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "FB")]
    nodes = [helper.make_node("Conv", ["input", "CW", "CB"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "FW", "FB"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "conv",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=10)
    onnx.checker.check_model(model)
    return model


def types_model() -> onnx.ModelProto:
    """One Identity per protocol datatype: in_<DT> [N,2] -> out_<DT> [N,2]."""
    nodes, inputs, outputs = [], [], []
    for name, (elem, _) in TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["N", 2]))
    model = helper.make_model(helper.make_graph(nodes, "types", inputs, outputs), opset_imports=OPSET, ir_version=10)
    onnx.checker.check_model(model)
    return model


def strings_model() -> onnx.ModelProto:
    """x FP32 [N,2] -> Cast(STRING) -> text BYTES [N,2]: a model whose output is not numeric."""
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["text"], to=TensorProto.STRING)], "strings",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=10)
    onnx.checker.check_model(model)
    return model


def write_repository(root: Path) -> Path:
    """classifier (2 certified versions), conv, types, static (batch 1), tampered, corrupt, badconfig."""
    def save(name: str, version: int, model: onnx.ModelProto | bytes) -> None:
        path = root / name / str(version) / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())

    save("classifier", 1, certified(gemm_model(1), 1))
    save("classifier", 2, certified(gemm_model(2), 2))
    save("conv", 1, conv_model())
    (root / "conv" / "config.json").write_text(json.dumps({"max_batch_size": 8, "max_queue_delay_ms": 0}))
    save("types", 1, types_model())
    save("strings", 1, strings_model())
    save("static", 1, gemm_model(3, batch=1))
    save("tampered", 1, certified(gemm_model(4), 4, tamper=0.5))
    save("corrupt", 1, b"this is not an onnx model")
    save("badconfig", 1, gemm_model(5))
    (root / "badconfig" / "config.json").write_text(json.dumps({"max_batch_sise": 4}))
    return root
