"""Static int8 quantization of a folded ONNX model with onnxruntime's quantizer (QDQ format).

Every quantizable layer's float weights ``W`` become ``s_c * (q - 0)``, ``q`` in [-64, 63]: per
output channel ``c``, symmetric, 7 bits (``reduce_range``); activations become ``s * (q - z)``,
``q`` in [0, 255], one scale and zero point per tensor from the calibration ranges
(``method``: min/max, entropy or percentile of the histogram). The graph keeps float tensors between
``QuantizeLinear``/``DequantizeLinear`` pairs; onnxruntime fuses them into integer kernels
(``QLinearConv``, ``QGemm``, ...) when it loads the model with its optimizations on.

Why uint8 activations and 7-bit weights: x86 integer kernels without VNNI multiply uint8 by int8
with ``vpmaddubsw``, which adds two products into a saturating int16. With 8-bit weights two
products of 255 x 127 overflow it, so the served kernel and the QDQ arithmetic differ (measured on
the digits CNN: by 2.9 in logits of magnitude 9, and 1.4 points of top-1 agreement); with 7-bit
weights the sum fits and both agree to the last bit here. VNNI kernels do not saturate either way,
so the same file computes the same integers on every x86 server. int8 activations (S8S8) ran 1.6x
slower than float on this AVX2 machine, uint8 ones faster.

Layers named in ``exclude`` keep float weights and compute in float (their inputs and outputs
may still be quantized where a neighbour is).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.quantize.calibration import Reader

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # layers with weights: the ones worth keeping float
METHODS = ("minmax", "entropy", "percentile")


def layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(name, op_type)`` of the layers whose weights the quantizer turns into int8, in graph order."""
    return [(node.name, node.op_type) for node in model.graph.node if node.op_type in QUANTIZABLE]


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose every node has a unique name (the quantizer excludes nodes by name)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return copy


class Quantizer:
    """Quantizes one model (every node named, see :func:`named`) on one calibration batch ``x``.

    Calibration runs once: the activation ranges of the float model do not depend on which layers
    are later kept in float, so onnxruntime's calibration cache (``calibration_cache_path``, where
    this onnxruntime has it) serves every further call. Use it as a context manager: it holds a
    temporary directory. Raises :class:`BnfoldError` for an unknown method.
    """

    def __init__(self, model: onnx.ModelProto, x: np.ndarray, *, method: str = "minmax",
                 progress: Callable[[str], None] = lambda _: None) -> None:
        if method not in METHODS:
            raise BnfoldError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
        self.model, self.x, self.method, self.progress = model, x, method, progress
        self._tmp = tempfile.TemporaryDirectory(prefix="bnfold-quantize-")
        self._source = Path(self._tmp.name) / "float.onnx"
        onnx.save(model, self._source)
        self._cache = Path(self._tmp.name) / "calibration.json"

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *_: object) -> None:
        self._tmp.cleanup()

    def __call__(self, exclude: Sequence[str] = ()) -> onnx.ModelProto:
        """The int8 QDQ model with the layers named in ``exclude`` kept in float; metadata kept.

        Raises :class:`BnfoldError` naming an unknown layer, or what onnxruntime refused.
        """
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        known = {name for name, _ in layers(self.model)}
        unknown = [name for name in exclude if name not in known]
        if unknown:
            raise BnfoldError(f"--keep-float names {', '.join(map(repr, unknown))}, not a layer of the model; "
                              f"its layers: {', '.join(sorted(known)) or 'none'}")
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        cache: dict[str, Any] = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            cache["calibration_cache_path"] = str(self._cache)
        target = Path(self._tmp.name) / "int8.onnx"
        reader = Reader(self.x, self.model.graph.input[0].name, self.progress)
        try:
            with _quiet():
                quantize_static(str(self._source), str(target), reader, quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=methods[self.method],
                                nodes_to_exclude=list(exclude), **cache)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise BnfoldError(f"onnxruntime could not quantize the model: {' '.join(str(exc).split())[:300]}") \
                from exc
        quantized = onnx.load(target)
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(self.model.metadata_props)
        return quantized


def quantize(model: onnx.ModelProto, x: np.ndarray, *, method: str = "minmax", exclude: Sequence[str] = (),
             progress: Callable[[str], None] = lambda _: None) -> onnx.ModelProto:
    """One int8 QDQ model of ``model`` calibrated on ``x`` (see :class:`Quantizer`)."""
    with Quantizer(model, x, method=method, progress=progress) as quantizer:
        return quantizer(exclude)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer prints histogram notes to stdout and logs advice at WARNING: keep them off the CLI's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
