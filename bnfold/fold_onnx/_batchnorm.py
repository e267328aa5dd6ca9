"""Match and check one ONNX ``BatchNormalization`` node: is it an inference-mode BN with constant
statistics, and what per-channel affine map does it compute?

``Y = scale * (X - input_mean) / sqrt(input_var + epsilon) + B`` along axis 1 of ``X``
(opset 7 with ``spatial=1``, opsets 9, 14, 15). Opset 14+ adds ``training_mode``; only
``training_mode=0`` is an affine map of ``X``. Before opset 14 the mode is implied by the outputs:
a node with the optional statistics outputs runs in training mode. Opset 7/8 ``spatial=0`` normalizes per element
(not per channel) and opsets below 7 carry ``is_test``; both are refused.
"""

from __future__ import annotations

import onnx

from bnfold.arith import Affine, bn_affine
from bnfold.fold_onnx._graph import Const, Graph

_PARAMS = ("scale", "B", "input_mean", "input_var")


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def read_batchnorm(g: Graph, node: onnx.NodeProto, opset: int) -> Affine | str:
    """The BN's affine map (float64), or why it cannot be treated as one."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if opset < 7:
        return (f"BatchNormalization in opset {opset} (is_test/spatial era) is not supported; upgrade "
                "with onnx.version_converter.convert_version(model, 15)")
    if opset < 9 and int(attrs.get("spatial", 1)) != 1:
        return "spatial=0 normalizes every element separately, not per channel; only spatial=1 folds"
    if int(attrs.get("training_mode", 0)) != 0:
        return ("training_mode=1 normalizes with batch statistics at run time; export the model in "
                "eval mode (training_mode=0)")
    for extra in node.output[1:]:
        if extra and g.uses[extra]:
            return (f"its running-statistics output '{extra}' is used; only the first output "
                    "(the normalized tensor) can be folded away")
    extras = [o for o in node.output[1:] if o]
    if opset < 14 and extras:
        # Before opset 14 the outputs select the mode: Y alone is test mode, Y plus statistics is training mode.
        return (f"in opset {opset} a BatchNormalization with statistics outputs ({', '.join(extras)}) runs in "
                "training mode, normalizing with batch statistics; export the model in eval mode")
    if len(node.input) != 5:
        return f"expected 5 inputs (X, scale, B, input_mean, input_var), got {len(node.input)}"
    params: list[Const] = []
    for role, name in zip(_PARAMS, node.input[1:], strict=True):
        value = g.constant(name, f"batch norm {role}")
        if isinstance(value, str):
            return value
        params.append(value)
    gamma, beta, mean, var = (p.value for p in params)
    try:
        return bn_affine(mean, var, float(attrs.get("epsilon", 1e-5)), gamma, beta)
    except ValueError as err:
        return str(err)
