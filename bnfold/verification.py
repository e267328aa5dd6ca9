"""Numerical equivalence of two models: max abs/rel error, top-1 agreement, pass/fail.

A fold is exact in real arithmetic; in float32 it differs from the original by rounding. To
tell rounding from a bug, both float32 models are compared with a *float64 reference* (a float64
deep copy of the original, when the original is a PyTorch module)::

    candidate error  = max |candidate(x) - ref(x)|      must be <= atol + rtol * max |ref(x)|
    original error   = max |original(x) - ref(x)|       shown beside it: the float32 baseline

so "the folded model is as accurate as the unfolded float32 model" is visible in one table.
When the original is an ONNX model (no float64 copy), the reference is the original itself.

A comparison passes only when it compared something: outputs with no samples or no elements, and
outputs holding NaN or infinity, fail with the reason in :attr:`VerifyReport.reason`.

Models may be ``torch.nn.Module``, ``onnx.ModelProto`` or a path to an ``.onnx`` file, in any
mix. onnxruntime runs with graph optimizations disabled (``ORT_DISABLE_ALL``) so that it
executes the graph as written. torch is imported only when a model is a PyTorch module.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from bnfold.errors import BnfoldError, VerificationFailed
from bnfold.tolerance import Tolerance

Runner = Callable[[np.ndarray], np.ndarray]
Reference = Literal["float64", "original"]

BATCH = 256  # samples per forward pass: bounds memory on large validation sets


@dataclass(frozen=True)
class Row:
    """One comparison: ``actual`` against ``reference`` on the same inputs."""

    actual: str
    reference: str
    max_abs_error: float
    max_rel_error: float  # max_abs_error / max |reference|
    allowed: float  # atol + rtol * max |reference|
    top1_agreement: float | None  # fraction of samples with the same argmax; None if not a classifier output
    passed: bool
    gating: bool  # whether this row decides the report's pass/fail (others are shown for context)


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`; the headline numbers are those of the gating comparison."""

    max_abs_error: float
    max_rel_error: float
    allowed: float
    top1_agreement: float | None
    n_samples: int
    passed: bool
    tolerance: Tolerance
    reference: str  # what the candidate was compared with, e.g. "original (float64)"
    inputs: str = "inputs"  # where the inputs came from, e.g. "random N(0,1)" or "digits validation"
    rows: list[Row] = field(default_factory=list)
    reason: str | None = None  # why it failed, a sentence naming the values; None when it passed

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["tolerance"] = self.tolerance.to_dict()
        return body

    def summary(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.2%}"
        rest = f"max rel error {self.max_rel_error:.3g}, top-1 agreement {top1}"
        if not self.passed:
            return f"FAILED on {self.n_samples} {self.inputs} samples: {self.reason}; {rest}"
        return (f"passed on {self.n_samples} {self.inputs} samples: max abs error {self.max_abs_error:.3g} "
                f"(allowed {self.allowed:.3g}), {rest}")

    def raise_if_failed(self) -> None:
        """Raise :class:`~bnfold.errors.VerificationFailed` with the reason (e.g. measured > allowed error)."""
        if not self.passed:
            raise VerificationFailed(
                f"verification failed against {self.reference} on {self.n_samples} {self.inputs} samples: "
                f"{self.reason}"
            )


def verify(
    original: Any,
    folded: Any,
    inputs: Any,
    *,
    tolerance: Tolerance | None = None,
    reference: Reference = "float64",
    names: tuple[str, str] = ("original", "folded"),
    inputs_label: str = "inputs",
    baseline: Baseline | None = None,
) -> VerifyReport:
    """Run ``original`` and ``folded`` on ``inputs`` (a batch, first axis = samples) and compare.

    ``reference="float64"`` compares both against a float64 copy of ``original`` when it is a
    PyTorch module (otherwise, and with ``reference="original"``, against ``original`` itself).
    ``baseline`` (from :func:`baseline_outputs` on the same original and inputs) skips re-running
    the original when several candidates are checked against it. Neither model is modified.
    Raises ``ValueError`` if the inputs are empty or the two models' outputs have different shapes;
    outputs that hold nothing to compare (no elements) or NaN/infinity give a failed report.
    """
    tolerance = tolerance or Tolerance()
    x = _batch(inputs)
    if baseline is None:
        baseline = baseline_outputs(original, x, reference=reference)
    elif baseline.original.shape[0] != x.shape[0]:
        raise ValueError(f"baseline has {baseline.original.shape[0]} samples but inputs have {x.shape[0]}")
    name_a, name_b = names
    out_a = baseline.original
    out_b = run_batched(runner(folded), x)
    if out_a.shape != out_b.shape:
        raise BnfoldError(f"{name_a} and {name_b} outputs differ in shape: {out_a.shape} vs {out_b.shape}")

    rows: list[Row] = []
    out_ref = baseline.float64
    if out_ref is not None:
        ref_name = f"{name_a} (float64)"
        outputs = {f"{name_b} (float32)": out_b, f"{name_a} (float32)": out_a, ref_name: out_ref}
        rows.append(_row(f"{name_b} (float32)", ref_name, out_b, out_ref, tolerance, gating=True))
        rows.append(_row(f"{name_a} (float32)", ref_name, out_a, out_ref, tolerance, gating=False))
        rows.append(_row(f"{name_b} (float32)", f"{name_a} (float32)", out_b, out_a, tolerance, gating=False))
    else:
        ref_name = name_a
        outputs = {name_b: out_b, name_a: out_a}
        rows.append(_row(name_b, name_a, out_b, out_a, tolerance, gating=True))
    head = rows[0]
    reason = _not_comparable(outputs, int(x.shape[0]))
    if reason is None and not head.passed:
        reason = (f"max abs error {head.max_abs_error:.3g} > allowed {head.allowed:.3g} "
                  f"(atol {tolerance.atol:g} + rtol {tolerance.rtol:g} * output scale)")
    return VerifyReport(
        max_abs_error=head.max_abs_error,
        max_rel_error=head.max_rel_error,
        allowed=head.allowed,
        top1_agreement=head.top1_agreement,
        n_samples=int(x.shape[0]),
        passed=reason is None,
        tolerance=tolerance,
        reference=ref_name,
        inputs=inputs_label,
        rows=rows,
        reason=reason,
    )


def _not_comparable(outputs: dict[str, np.ndarray], n_inputs: int) -> str | None:
    """Why these outputs (by model name, all of one shape) cannot show equivalence, or None.

    An empty comparison would pass vacuously (the max error of nothing is 0), and NaN/infinity
    compare as nothing either; both are failures, not passes.
    """
    shape = next(iter(outputs.values())).shape
    if not shape or shape[0] == 0:
        return f"nothing was compared: the outputs have shape {shape}, no samples for {n_inputs} inputs"
    if math.prod(shape) == 0:
        return f"nothing was compared: the outputs have shape {shape}, which holds no values"
    bad = [f"{name} in {out.size - np.count_nonzero(np.isfinite(out))} of {out.size} values"
           for name, out in outputs.items() if not np.all(np.isfinite(out))]
    return f"outputs hold NaN or infinity: {'; '.join(bad)}" if bad else None


@dataclass(frozen=True)
class Baseline:
    """The original model's outputs on some inputs: as is, and from its float64 copy (if any)."""

    original: np.ndarray
    float64: np.ndarray | None


def baseline_outputs(original: Any, inputs: Any, *, reference: Reference = "float64") -> Baseline:
    """Run ``original`` (and, for ``reference="float64"`` and a PyTorch module, its float64 copy)."""
    if reference not in ("float64", "original"):
        raise ValueError(f"reference must be 'float64' or 'original', got {reference!r}")
    x = _batch(inputs)
    ref64 = _float64_copy(original) if reference == "float64" else None
    return Baseline(run_batched(runner(original), x),
                    None if ref64 is None else run_batched(ref64, x.astype(np.float64)))


def _row(actual: str, reference: str, out: np.ndarray, ref: np.ndarray, tol: Tolerance, *, gating: bool) -> Row:
    cmp = tol.compare(out, ref)
    return Row(actual, reference, cmp.max_abs, cmp.max_rel, cmp.allowed, top1_agreement(out, ref), cmp.passed, gating)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fraction of samples whose argmax over the last axis agrees; ``None`` unless outputs are ``(N>0, C>1)``."""
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < 2:
        return None
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


# ---------------------------------------------------------------------------------------------
# Runners: one callable ``ndarray -> ndarray`` per model kind.


def runner(model: Any) -> Runner:
    """A function running ``model`` (torch module, ONNX proto or ``.onnx`` path) on a numpy batch."""
    if isinstance(model, (str, os.PathLike)):
        from bnfold.export import read_onnx

        model = read_onnx(model)
    if type(model).__name__ == "ModelProto":
        return ort_runner(model)
    torch = _torch()
    if torch is not None and isinstance(model, torch.nn.Module):
        return _torch_runner(model)
    raise TypeError(f"cannot run a {type(model).__name__}: expected a torch.nn.Module, onnx.ModelProto or .onnx path")


def ort_runner(model: Any, *, optimize: bool = False, threads: int = 0) -> Runner:
    """Run an ONNX model with onnxruntime on CPU; graph optimizations off unless ``optimize``.

    Feeds the first graph input (cast to its declared dtype) and returns the first output. A
    model with a fixed batch size ``b`` is run in chunks of ``b`` (the last one padded by
    repeating its first sample, and the padding's outputs dropped).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise BnfoldError(f"onnxruntime cannot load the model: {ort_message(exc)}") from exc
    feed = session.get_inputs()[0]
    dtype = np.float64 if feed.type == "tensor(double)" else np.float32

    fixed = feed.shape[0] if feed.shape and isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None

    def run_once(x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(session.run(None, {feed.name: np.ascontiguousarray(x, dtype=dtype)})[0])
        except Exception as exc:  # onnxruntime's own exception types
            raise BnfoldError(
                f"onnxruntime failed on input {feed.name!r} of shape {list(x.shape)} (model expects {feed.shape}): "
                f"{ort_message(exc)}"
            ) from exc

    def run(x: np.ndarray) -> np.ndarray:
        if fixed is None or x.shape[0] == fixed:
            return run_once(x)
        outs = []
        for i in range(0, x.shape[0], fixed):
            chunk = x[i : i + fixed]
            n = chunk.shape[0]
            if n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], fixed - n, axis=0)])
            outs.append(run_once(chunk)[:n])
        return np.concatenate(outs, axis=0)

    return run


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (/\S+:\d+ .*?\)\s(?=[A-Z\[]))?")


def ort_message(exc: BaseException) -> str:
    """onnxruntime's error text without its status code and C++ source location, on one line."""
    text = _ORT_PREFIX.sub("", " ".join(str(exc).split()))
    return text if len(text) <= 300 else text[:300] + "..."


def _torch_runner(module: Any) -> Runner:
    torch = _torch()
    params = [*module.parameters(), *module.buffers()]
    dtype = params[0].dtype if params else torch.float32

    def run(x: np.ndarray) -> np.ndarray:
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                out = module(torch.as_tensor(np.ascontiguousarray(x)).to(dtype))
        finally:
            module.train(was_training)
        return _first_tensor(out).detach().cpu().numpy()

    return run


def _float64_copy(model: Any) -> Runner | None:
    torch = _torch()
    if torch is None or not isinstance(model, torch.nn.Module):
        return None
    return _torch_runner(copy.deepcopy(model).to(torch.float64).eval())


def _first_tensor(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    return out


def run_batched(run: Runner, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Run in chunks of ``batch`` samples and concatenate (same result, bounded memory)."""
    return np.concatenate([run(x[i : i + batch]) for i in range(0, x.shape[0], batch)], axis=0)


def _batch(inputs: Any) -> np.ndarray:
    """``inputs`` as a float32 array of at least one sample; raises ``ValueError`` naming the shape."""
    x = _as_array(inputs)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"verification needs a non-empty batch of inputs, got shape {x.shape}")
    return x


def _as_array(inputs: Any) -> np.ndarray:
    torch = _torch()
    if torch is not None and isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu().numpy()
    return np.asarray(inputs, dtype=np.float32)  # models run in float32; the reference upcasts these values


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - the serving install has no torch
        return None
    return torch
