"""Per-layer sensitivity to int8, and keeping the most sensitive layers in float until the contract holds.

A layer's sensitivity is what keeping it alone in float buys: the model is quantized again with
every other layer int8, and measured on the same held-out samples as the full int8 model. Layers
are ranked by the agreement reached that way, then by how far the mean |int8 - float| output
error falls (on a small validation split many layers tie on agreement). Each measurement
quantizes the model once more (reusing the calibration ranges, see
:class:`bnfold.quantize.static.Quantizer`) and runs it on the held-out samples, so at most
:data:`MAX_LAYERS` layers are measured (the first ones in graph order; the report says how many
there were).

``--keep-float auto`` then keeps layers in float in that order, one more each time, re-quantizing
and re-measuring, until the contract holds or every measured layer is float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from bnfold.quantize import static
from bnfold.quantize.contract import Bounds, Measured

MAX_LAYERS = 64
Measure = Callable[[onnx.ModelProto], Measured]  # runs a quantized model on the held-out samples


@dataclass(frozen=True)
class Layer:
    """One layer's sensitivity: the model measured with this layer alone kept in float."""

    name: str
    op: str
    measured: Measured
    error_reduction: float  # full int8 mean abs error minus this one's

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "op": self.op, "error_reduction": self.error_reduction,
                **self.measured.to_dict()}


def rank(quantize: static.Quantizer, measure: Measure, base: Measured, *,
         progress: Callable[[str], None]) -> list[Layer]:
    """Every layer of the quantizer's model, most sensitive first."""
    found = static.layers(quantize.model)[:MAX_LAYERS]
    rows = []
    for i, (name, op) in enumerate(found, 1):
        progress(f"sensitivity: layer {i} of {len(found)} ({name}) in float")
        measured = measure(quantize([name]))
        rows.append(Layer(name, op, measured, base.mean_abs_error - measured.mean_abs_error))
    return sorted(rows, key=lambda r: (-r.measured.agreement, -r.error_reduction))


@dataclass(frozen=True)
class Attempt:
    """One quantization tried: the layers kept in float and what was measured."""

    kept_float: tuple[str, ...]
    measured: Measured
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"kept_float": list(self.kept_float), "passed": self.passed, **self.measured.to_dict()}


def keep_float_until_pass(quantize: static.Quantizer, measure: Measure, ranked: list[Layer], bounds: Bounds, *,
                          progress: Callable[[str], None]) -> tuple[onnx.ModelProto | None, list[Attempt]]:
    """Keep the first 1, 2, ... layers of ``ranked`` in float; the first model meeting ``bounds``, or ``None``."""
    attempts = []
    for n in range(1, len(ranked) + 1):
        kept = tuple(layer.name for layer in ranked[:n])
        progress(f"keeping {n} of {len(ranked)} layers in float")
        candidate = quantize(kept)
        measured = measure(candidate)
        passed = measured.reason(bounds) is None
        attempts.append(Attempt(kept, measured, passed))
        if passed:
            return candidate, attempts
    return None, attempts
