"""The verification contract of an int8 model: agreement and accuracy, not equality.

An int8 model is not equal to its float model within a float32 tolerance: every activation is
rounded to one of 256 levels. What it must keep is its answers. On held-out samples ``x_i``
(``n`` of them, never calibrated on), with ``f`` the certified float folded model and ``q`` the
int8 model as the server runs it (onnxruntime, optimizations on: integer kernels)::

    agreement      = #{i : argmax q(x_i) = argmax f(x_i)} / n        must be >= min_agreement
    accuracy drop  = acc(f) - acc(q),  acc(m) = #{i : argmax m(x_i) = y_i} / n
                                                                     must be <= max_accuracy_drop

(defaults 0.99 and 0.005, i.e. 0.5 points). Without labels that mean the outputs only agreement
is measured, and the report says so.

The self-test tolerance. The model's output ``y = s * (q - z)`` is the last ``DequantizeLinear``'s
output, an integer grid of step ``s`` (its scale). The integer arithmetic before it is exact and
the same on every x86 instruction set (7-bit weights: no int16 saturation, see
:mod:`bnfold.quantize.static`); what may differ between CPUs and kernels is how each layer's int32
accumulator is requantized (a float multiply here, a fixed-point one there), which can move a
value sitting on a rounding boundary by one step, and that step can move later ones. The
certificate therefore allows :data:`SELFTEST_STEPS` steps of the output grid: ``atol = 4 * s``,
``rtol = 0``. It is far below what changes an answer on real inputs (logit gaps are many steps)
and far above a float32 rounding difference. A graph whose output is not dequantized (its last
layer kept in float) uses the step an int8 grid over the self-test's output range would have,
``max|y| / 127``. Before writing, the self-test is run through both onnxruntime paths here (integer
kernels, and the QDQ graph executed as written in float) and must pass on both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.tolerance import Tolerance

Runner = Callable[[np.ndarray], np.ndarray]
SELFTEST_STEPS = 4  # output quantization steps the self-test may differ by (see the module docstring)


@dataclass(frozen=True)
class Bounds:
    """What an int8 model must keep of its float model's answers."""

    min_agreement: float = 0.99  # top-1 agreement with the float folded model, as a fraction
    max_accuracy_drop: float = 0.005  # float accuracy minus int8 accuracy, as a fraction (0.005 = 0.5 points)


@dataclass(frozen=True)
class Measured:
    """One int8 model's answers against the float model's on the same held-out samples."""

    agreement: float
    samples: int
    inputs: str  # what they were, e.g. "digits validation"
    float_accuracy: float | None  # None: no labels that mean the outputs
    int8_accuracy: float | None
    mean_abs_error: float  # mean |q(x) - f(x)| over all outputs: ranks layers when agreement ties

    @property
    def accuracy_drop(self) -> float | None:
        if self.float_accuracy is None or self.int8_accuracy is None:
            return None
        return self.float_accuracy - self.int8_accuracy

    def reason(self, bounds: Bounds) -> str | None:
        """Why this misses ``bounds`` (naming the values), or ``None`` when it meets them."""
        misses = []
        if self.agreement < bounds.min_agreement:
            misses.append(f"top-1 agreement with the float model {self.agreement:.2%} < {bounds.min_agreement:.2%} "
                          f"on {self.samples} {self.inputs} samples")
        drop = self.accuracy_drop
        if drop is not None and drop > bounds.max_accuracy_drop + 1e-12:
            misses.append(f"accuracy dropped {drop * 100:.2f} points ({self.float_accuracy:.2%} float, "
                          f"{self.int8_accuracy:.2%} int8) > {bounds.max_accuracy_drop * 100:g} allowed")
        return "; ".join(misses) or None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop}


def measure(float_outputs: np.ndarray, int8: Runner, x: np.ndarray, y: np.ndarray | None, inputs: str) -> Measured:
    """Run ``int8`` on ``x`` and compare with the float model's outputs on ``x`` (and labels ``y``)."""
    from bnfold.verification import run_batched

    out = run_batched(int8, x)
    if out.shape != float_outputs.shape or out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"the contract needs class scores of shape (N, C>1) from both models, got {out.shape} "
                         f"(int8) and {float_outputs.shape} (float)")
    top_q, top_f = out.argmax(axis=1), float_outputs.argmax(axis=1)
    return Measured(
        agreement=float(np.mean(top_q == top_f)), samples=int(x.shape[0]), inputs=inputs,
        float_accuracy=None if y is None else float(np.mean(top_f == y)),
        int8_accuracy=None if y is None else float(np.mean(top_q == y)),
        mean_abs_error=float(np.mean(np.abs(out.astype(np.float64) - float_outputs))),
    )


def output_scale(model: onnx.ModelProto, selftest_output: np.ndarray) -> float:
    """The step of the first graph output's grid: its ``DequantizeLinear`` scale, else ``max|y| / 127``."""
    output = model.graph.output[0].name
    producer = next((n for n in model.graph.node if output in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":
        scales = {t.name: t for t in model.graph.initializer}
        if producer.input[1] in scales:
            scale = numpy_helper.to_array(scales[producer.input[1]]).astype(np.float64)
            if scale.size and np.all(np.isfinite(scale)) and float(scale.max()) > 0:
                return float(scale.max())
    peak = float(np.max(np.abs(selftest_output))) if selftest_output.size else 0.0
    return peak / 127 if peak > 0 else 1e-6


def selftest_tolerance(scale: float) -> Tolerance:
    """:data:`SELFTEST_STEPS` steps of the output grid, nothing relative (see the module docstring)."""
    return Tolerance(atol=SELFTEST_STEPS * scale, rtol=0.0)
