"""Int8: quantize a folded, certified float model, hold it to its own contract, certify what it is.

``bnfold fold CK --quantize int8`` runs the float pipeline first (fold, verify against float64,
export, certify: :mod:`bnfold.pipeline`), then:

1. *calibrate and quantize* the certified float graph statically, QDQ format, per-channel 7-bit
   weights and uint8 activations (:mod:`bnfold.quantize.static`) on at most ``samples`` training
   samples (:mod:`bnfold.quantize.calibration`), keeping the layers of ``keep_float`` in float;
2. *measure the contract* (:mod:`bnfold.quantize.contract`) on held-out samples: top-1 agreement
   with the float model and the accuracy drop, with the int8 model run as the server runs it;
3. on a miss, measure *per-layer sensitivity* (:mod:`bnfold.quantize.sensitivity`) and, with
   ``keep_float="auto"``, keep the most sensitive layers in float until it passes; still missing,
   raise :class:`QuantizationFailed` (exit 1: the report is written, the model is not);
4. *certify* the int8 graph: a certificate of kind ``"int8"`` carrying the float model's
   measurements and digests, the calibration and the contract's numbers, and a self-test vector
   produced by the int8 model itself with a tolerance of a few output quantization steps, re-read
   from the serialized bytes and re-checked through both onnxruntime execution paths.

What is written is the int8 model; the float model is described in its certificate
(``float_model_sha256``, ``float_certificate_sha256``, the float ``errors``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from bnfold import certificate, export
from bnfold.errors import VerificationFailed
from bnfold.pipeline import Config, FoldFailed, Outcome, Source
from bnfold.quantize import calibration, contract, sensitivity, static
from bnfold.quantize.calibration import Calibration
from bnfold.quantize.contract import Bounds, Measured
from bnfold.quantize.sensitivity import Attempt, Layer
from bnfold.tolerance import Comparison
from bnfold.verification import ort_runner, run_batched

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Bounds", "Calibration", "QuantizationFailed", "QuantizeOptions", "QuantizedOutcome", "Report",
           "calibration_for", "quantize_outcome"]


@dataclass(frozen=True)
class QuantizeOptions:
    """How ``bnfold fold --quantize int8`` quantizes, and what it must keep."""

    method: str = "minmax"  # calibration: minmax, entropy or percentile (static.METHODS)
    samples: int = 256  # calibration samples, at most; from 16 to 10000
    calibration_data: str | None = None  # bundled name or data path; default: the verification data
    bounds: Bounds = field(default_factory=Bounds)
    keep_float: tuple[str, ...] | Literal["auto"] = ()  # layer names kept in float, or "auto"


def calibration_for(source: Source, config: Config, options: QuantizeOptions) -> Calibration:
    """Load and check the calibration data before any work (a :class:`BnfoldError`, exit 2, if it is bad)."""
    if options.method not in static.METHODS:
        from bnfold.errors import BnfoldError

        raise BnfoldError(f"--calibration-method must be one of {', '.join(static.METHODS)}, got {options.method!r}")
    return calibration.calibration_for(source, config, options.samples, options.calibration_data)


@dataclass
class Report:
    """What quantization measured: every attempt, the sensitivity when the first one missed, the self-tests."""

    options: QuantizeOptions
    calibration: str  # e.g. "256 digits train samples"
    samples: int
    attempts: list[Attempt]
    sensitivity: list[Layer] = field(default_factory=list)
    layers: int = 0  # quantizable layers in the model
    notes: list[str] = field(default_factory=list)
    selftests: dict[str, Comparison] = field(default_factory=dict)  # by onnxruntime path
    float_model_sha256: str = ""
    float_certificate_sha256: str = ""

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    def to_dict(self) -> dict[str, Any]:
        opts = self.options
        return {
            "method": opts.method, "samples": self.samples, "calibration_data": self.calibration,
            "bounds": dataclasses.asdict(opts.bounds), "keep_float": opts.keep_float if opts.keep_float == "auto"
            else list(opts.keep_float), "layers": self.layers,
            "passed": self.final.passed, "kept_float": list(self.final.kept_float),
            "measured": self.final.measured.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "sensitivity": [row.to_dict() for row in self.sensitivity],
            "selftest": {path: {"max_abs_error": c.max_abs, "allowed": c.allowed, "passed": c.passed}
                         for path, c in self.selftests.items()},
            "float_model_sha256": self.float_model_sha256,
            "float_certificate_sha256": self.float_certificate_sha256,
            "notes": list(self.notes),
        }


@dataclass
class QuantizedOutcome(Outcome):
    """An :class:`~bnfold.pipeline.Outcome` whose model is the int8 one; ``float_model`` is what it came from."""

    float_model: onnx.ModelProto | None = None
    float_certificate: certificate.Certificate | None = None
    quantization: Report | None = None

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        assert self.quantization is not None and self.float_certificate is not None
        body["kind"] = "int8"
        body["quantization"] = self.quantization.to_dict()
        body["float_tolerance"] = self.float_certificate.tolerance.to_dict()
        return body


class QuantizationFailed(FoldFailed):
    """The int8 model missed its contract (or its self-test); ``report`` holds every measurement."""

    def __init__(self, message: str, outcome: Outcome, report: Report) -> None:
        super().__init__(message, source=outcome.source, checks=outcome.checks, fold=outcome.fold,
                         notes=[*outcome.notes, *report.notes], timings=outcome.timings,
                         tolerance=outcome.certificate.tolerance)
        self.report = report

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kind": "int8", "quantization": self.report.to_dict()}


def _served(model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """The int8 model as the server runs it: onnxruntime with optimizations on (integer kernels)."""
    return ort_runner(model, optimize=True)


def quantize_outcome(outcome: Outcome, data: Calibration, options: QuantizeOptions, *,
                     status: Callable[[str], None] = lambda _: None) -> QuantizedOutcome:
    """Quantize ``outcome``'s certified float model and certify the int8 model (see the module docstring).

    Raises :class:`QuantizationFailed` when no attempt meets ``options.bounds`` or the int8
    self-test does not reproduce; :class:`~bnfold.errors.BnfoldError` for an unknown layer name.
    """
    timings = outcome.timings
    start = time.perf_counter()
    model = static.named(outcome.onnx_model)
    float_out = run_batched(ort_runner(model), data.eval_x)  # the certified float graph, as written

    def measure(candidate: onnx.ModelProto) -> Measured:
        return contract.measure(float_out, _served(candidate), data.eval_x, data.eval_y, data.eval_name)

    auto = options.keep_float == "auto"
    first_kept: tuple[str, ...] = () if auto else tuple(options.keep_float)
    status(f"quantizing to int8 ({options.method} calibration on {data.x.shape[0]} samples)")
    with static.Quantizer(model, data.x, method=options.method, progress=status) as quantize:
        quantized: onnx.ModelProto | None = quantize(first_kept)
        quantize.progress = lambda _: None  # calibrated once: later calls reuse the ranges
        assert quantized is not None
        measured = measure(quantized)
        float_bytes = outcome.onnx_model.SerializeToString()
        report = Report(options, f"{data.x.shape[0]} {data.name} samples", int(data.x.shape[0]),
                        [Attempt(first_kept, measured, measured.reason(options.bounds) is None)],
                        layers=len(static.layers(model)), notes=list(data.notes),
                        float_model_sha256=hashlib.sha256(float_bytes).hexdigest(),
                        float_certificate_sha256=hashlib.sha256(outcome.certificate.to_json().encode()).hexdigest())
        timings["quantize"] = time.perf_counter() - start
        if not report.final.passed:
            start = time.perf_counter()
            status("the int8 model misses its contract: measuring each layer's sensitivity")
            report.sensitivity = sensitivity.rank(quantize, measure, measured, progress=status)
            if report.layers > sensitivity.MAX_LAYERS:
                report.notes.append(f"sensitivity measured for the first {sensitivity.MAX_LAYERS} of "
                                    f"{report.layers} layers")
            if auto:
                quantized, tried = sensitivity.keep_float_until_pass(quantize, measure, report.sensitivity,
                                                                     options.bounds, progress=status)
                report.attempts += tried
            timings["sensitivity"] = time.perf_counter() - start
    if not report.final.passed or quantized is None:
        why = report.final.measured.reason(options.bounds)
        kept = report.final.kept_float
        raise QuantizationFailed(f"the int8 model misses its contract: {why}" + (
            f" (with {len(kept)} of {report.layers} layers kept in float)" if kept else ""), outcome, report)
    status("certifying the int8 model")
    start = time.perf_counter()
    proto, cert = _certify(quantized, outcome, report, data)
    timings["certify_int8"] = time.perf_counter() - start
    base = {f.name: getattr(outcome, f.name) for f in dataclasses.fields(Outcome)}
    return QuantizedOutcome(**{**base, "onnx_model": proto, "certificate": cert,
                               "selftest": report.selftests["QDQ reference"],
                               "notes": [*outcome.notes, *report.notes], "timings": timings},
                            float_model=outcome.onnx_model, float_certificate=outcome.certificate,
                            quantization=report)


def _certify(quantized: onnx.ModelProto, outcome: Outcome, report: Report,
             data: Calibration) -> tuple[onnx.ModelProto, certificate.Certificate]:
    """Attach the int8 certificate; re-read it from the bytes and re-check its self-test on both onnxruntime paths."""
    final = report.final.measured
    x = outcome.certificate.selftest_input
    y = _served(quantized)(x)
    scale = contract.output_scale(quantized, y)
    bounds = report.options.bounds
    cert = dataclasses.replace(
        outcome.certificate, selftest_output=y, tolerance=contract.selftest_tolerance(scale), kind="int8",
        batchnorm_nodes=len(export.batchnorm_nodes(quantized)), opset=export.opset_of(quantized),
        quantization={
            "method": report.options.method, "samples": report.samples, "calibration_data": data.name,
            "agreement": final.agreement, "agreement_samples": final.samples, "agreement_inputs": final.inputs,
            "float_accuracy": final.float_accuracy, "int8_accuracy": final.int8_accuracy,
            "min_agreement": bounds.min_agreement, "max_accuracy_drop": bounds.max_accuracy_drop,
            "kept_float": list(report.final.kept_float), "output_scale": scale,
            "float_model_sha256": report.float_model_sha256,
            "float_certificate_sha256": report.float_certificate_sha256,
        })
    certificate.attach(quantized, cert)
    written = onnx.load_from_string(quantized.SerializeToString())
    again = certificate.read({e.key: e.value for e in written.metadata_props})
    if again is None or again.kind != "int8":
        raise VerificationFailed("the int8 certificate did not survive serialization")
    for path, run in (("integer kernels", _served(written)), ("QDQ reference", ort_runner(written))):
        report.selftests[path] = comparison = again.check(run)
        if not comparison.passed:
            raise QuantizationFailed(
                f"the int8 self-test does not reproduce through onnxruntime's {path}: max abs error "
                f"{comparison.max_abs:.3g} > allowed {comparison.allowed:.3g} ({contract.SELFTEST_STEPS} output "
                "quantization steps)", outcome, report)
    return written, cert
