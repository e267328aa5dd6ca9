"""The verification certificate carried in an ONNX model's ``metadata_props``.

One metadata entry, key :data:`METADATA_KEY`, holds a JSON object::

    {"format": "bnfold-certificate", "version": 1,
     "bnfold_version": "...", "source_sha256": "...", "architecture": "...",
     "input_name": "input", "output_name": "logits", "input_shape": [1, 8, 8],
     "class_labels": ["0", ...], "folded": 5, "kept": 0, "batchnorm_nodes": 0,
     "opset": 17, "exporter": "dynamo",
     "errors": {...measured max abs/rel errors and top-1 agreement...},
     "tolerance": {"atol": 1e-05, "rtol": 0.0001},
     "selftest": {"input": "<npy|zlib|base64>", "output": "<npy|zlib|base64>"}}

``folded`` and ``kept`` count every batch norm of the source, whichever fold (PyTorch or ONNX)
decided it; ``batchnorm_nodes`` is measured on the graph the certificate is written into, and
``kept - batchnorm_nodes`` norms were kept in a form that is no BatchNormalization node (an input
normalization exported as Mul/Add). ``opset`` is the default-domain opset written and
``exporter`` the torch.onnx exporter that wrote the graph ("" for an ONNX input). Certificates
written before these three fields existed read them as ``None`` / ``""``.

``kind`` says what the file is: ``"float"`` (a folded float model; certificates written before
the field existed read as float) or ``"int8"`` (that folded model, statically quantized, see
:mod:`bnfold.quantize`). An int8 certificate carries a ``quantization`` object (a float one
none)::

    {"method": "minmax", "samples": 256, "calibration_data": "digits train",
     "agreement": 0.9944, "agreement_samples": 359, "agreement_inputs": "digits validation",
     "float_accuracy": 0.9889, "int8_accuracy": 0.9889, "min_agreement": 0.99,
     "max_accuracy_drop": 0.005, "kept_float": ["node_conv2d"], "output_scale": 0.05,
     "float_model_sha256": "...", "float_certificate_sha256": "..."}

The accuracies are ``null`` when no labelled data was measured. Its ``errors`` and counts are
those of the float model it was quantized from; its self-test vector and tolerance are the int8
model's own.

The self-test vector is an input batch and the output the verified model produced for it, so
any runtime can re-check the artifact: run ``input`` and compare with ``output`` under
``tolerance`` (see :mod:`bnfold.tolerance`). Arrays are ``.npy`` bytes (dtype and shape
included, never pickled), zlib-compressed, base64-encoded. numpy and onnx only: the service
imports this module without torch.

Reading is bounded, because a server parses certificates of files it did not write: the text is
at most :data:`MAX_TEXT_CHARS` with at most :data:`MAX_ITEMS` commas (base64 has none, so this
bounds the number of JSON values), JSON nests at most :data:`MAX_DEPTH` levels, each self-test array
decompresses to at most :data:`MAX_ARRAY_BYTES` (a zlib bomb is refused before it is inflated), the
counts are JSON integers from 0 to :data:`MAX_COUNT` and the tolerance is finite and non-negative
(``1e400`` parses as infinity, and is refused). Every violation is a ``ValueError``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnfold.tolerance import Comparison, Tolerance

METADATA_KEY = "bnfold.certificate"
FORMAT = "bnfold-certificate"
VERSION = 1
MAX_TEXT_CHARS = 128 * 1024 * 1024  # the whole metadata value
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # one self-test array's .npy bytes, decompressed
MAX_DEPTH = 16  # JSON nesting (the certificate itself uses 3 levels)
MAX_ITEMS = 1_000_000  # JSON values, counted by their commas: parsed, [0.5,0.5,...] takes ~8x its text
MAX_COUNT = 1_000_000  # folded, kept, batchnorm_nodes, opset, input_shape entries
KINDS = ("float", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MAX_NAME_CHARS = 512  # one layer name or data description in the quantization block
MAX_KEPT_FLOAT = 10_000  # layer names in quantization.kept_float


def encode_array(array: np.ndarray) -> str:
    """Encode an array compactly as base64(zlib(npy bytes))."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(zlib.compress(buf.getvalue(), 9)).decode("ascii")


def decode_array(text: str, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """Inverse of :func:`encode_array`. Raises ``ValueError`` on malformed text (never unpickles).

    Inflates at most ``max_bytes`` (plus one, to tell): a larger array is refused, not decompressed.
    """
    if not isinstance(text, str):
        raise ValueError(f"encoded array in certificate must be a string, got {type(text).__name__}")
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(text.encode("ascii"), validate=True), max_bytes + 1)
        if len(raw) > max_bytes:
            raise ValueError(f"it decompresses to more than {max_bytes} bytes")
        if not inflater.eof:
            raise ValueError("its zlib stream is truncated")
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, zlib.error, OSError, UnicodeEncodeError) as exc:
        raise ValueError(f"malformed encoded array in certificate: {exc}") from exc


@dataclass
class Certificate:
    """What was verified about a folded model, and a self-test vector to re-check it."""

    input_name: str
    output_name: str
    selftest_input: np.ndarray
    selftest_output: np.ndarray
    tolerance: Tolerance = field(default_factory=Tolerance)
    bnfold_version: str = ""
    source_sha256: str = ""
    architecture: str = ""
    input_shape: list[int] = field(default_factory=list)
    class_labels: list[str] = field(default_factory=list)
    folded: int = 0
    kept: int = 0
    errors: dict[str, Any] = field(default_factory=dict)
    batchnorm_nodes: int | None = None  # BatchNormalization nodes in the certified graph
    opset: int | None = None
    exporter: str = ""
    kind: str = "float"  # one of KINDS
    quantization: dict[str, Any] | None = None  # int8 only: how it was calibrated and what was measured

    def to_json(self) -> str:
        body: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for key, value in asdict(self).items():
            if key in ("selftest_input", "selftest_output", "tolerance"):
                continue
            body[key] = value
        body["tolerance"] = self.tolerance.to_dict()
        body["selftest"] = {
            "input": encode_array(self.selftest_input),
            "output": encode_array(self.selftest_output),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        """Parse a certificate. Raises ``ValueError`` naming what is missing, malformed or out of bounds."""
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"certificate has {len(text)} characters, more than the {MAX_TEXT_CHARS} allowed")
        if text.count(",") > MAX_ITEMS:
            raise ValueError(f"certificate has more than {MAX_ITEMS} JSON values")
        try:
            body = json.loads(text)
        except RecursionError as exc:
            raise ValueError(f"certificate JSON nests deeper than {MAX_DEPTH} levels") from exc
        except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
            raise ValueError(f"certificate is not valid JSON: {exc}") from exc
        _check_depth(body)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"certificate format must be {FORMAT!r}")
        if body.get("version") != VERSION:
            raise ValueError(f"certificate version {body.get('version')!r} is not supported (expected {VERSION})")
        try:
            tol = body["tolerance"]
            selftest = body["selftest"]
            kind = body.get("kind", "float")
            if kind not in KINDS:
                raise ValueError(f"certificate kind must be one of {', '.join(KINDS)}, got {str(kind)[:40]}")
            quantization = _quantization(body.get("quantization"), kind)
            return cls(
                input_name=str(body["input_name"]),
                output_name=str(body["output_name"]),
                selftest_input=decode_array(selftest["input"]),
                selftest_output=decode_array(selftest["output"]),
                tolerance=Tolerance(atol=_finite(tol, "atol"), rtol=_finite(tol, "rtol")),
                bnfold_version=str(body.get("bnfold_version", "")),
                source_sha256=str(body.get("source_sha256", "")),
                architecture=str(body.get("architecture", "")),
                input_shape=[_count(d, "input_shape entry") for d in body.get("input_shape", [])],
                class_labels=[str(c) for c in body.get("class_labels", [])],
                folded=_count(body.get("folded", 0), "folded"),
                kept=_count(body.get("kept", 0), "kept"),
                errors=dict(body.get("errors", {})),
                batchnorm_nodes=_count_or_none(body.get("batchnorm_nodes"), "batchnorm_nodes"),
                opset=_count_or_none(body.get("opset"), "opset"),
                exporter=str(body.get("exporter", "")),
                kind=kind,
                quantization=quantization,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"certificate is missing or has a malformed field: {exc}") from exc

    def check(self, run: Callable[[np.ndarray], np.ndarray]) -> Comparison:
        """Run the self-test input through ``run`` and compare with the certified output."""
        return self.tolerance.compare(run(self.selftest_input), self.selftest_output)


def _check_depth(body: Any) -> None:
    """Raise ``ValueError`` if ``body`` nests lists/objects deeper than :data:`MAX_DEPTH` (iterative: no recursion)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    raise ValueError(f"certificate JSON nests deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))


def _count(value: Any, name: str) -> int:
    """A JSON integer from 0 to :data:`MAX_COUNT` (not a bool, not a float such as ``1e400`` = inf)."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"certificate {name} must be an integer from 0 to {MAX_COUNT}, got {str(value)[:40]}")
    return value


def _count_or_none(value: Any, name: str) -> int | None:
    return None if value is None else _count(value, name)


_QUANTIZATION_TEXT = ("calibration_data", "agreement_inputs", "float_model_sha256", "float_certificate_sha256")
_QUANTIZATION_FRACTIONS = ("agreement", "min_agreement", "max_accuracy_drop")
_QUANTIZATION_ACCURACIES = ("float_accuracy", "int8_accuracy")


def _quantization(value: Any, kind: str) -> dict[str, Any] | None:
    """The ``quantization`` block: required and checked for ``int8``, absent for ``float``."""
    if kind == "float":
        if value is not None:
            raise ValueError("a float certificate carries no quantization block")
        return None
    if not isinstance(value, dict):
        raise ValueError(f"an {kind} certificate needs a quantization object, got {type(value).__name__}")
    method = value.get("method")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"certificate quantization method must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {str(method)[:40]}")
    out: dict[str, Any] = {"method": method}
    for key in ("samples", "agreement_samples"):
        out[key] = _count(value.get(key), f"quantization {key}")
    for key in _QUANTIZATION_TEXT:
        text = value.get(key, "")
        if not isinstance(text, str) or len(text) > MAX_NAME_CHARS:
            raise ValueError(f"certificate quantization {key} must be a string of at most {MAX_NAME_CHARS} "
                             f"characters, got {str(text)[:40]}")
        out[key] = text
    for key in _QUANTIZATION_FRACTIONS:
        out[key] = _fraction(value.get(key), f"quantization {key}")
    for key in _QUANTIZATION_ACCURACIES:
        out[key] = None if value.get(key) is None else _fraction(value.get(key), f"quantization {key}")
    kept = value.get("kept_float", [])
    if not isinstance(kept, list) or len(kept) > MAX_KEPT_FLOAT or \
            not all(isinstance(k, str) and len(k) <= MAX_NAME_CHARS for k in kept):
        raise ValueError(f"certificate quantization kept_float must be a list of at most {MAX_KEPT_FLOAT} layer "
                         f"names of at most {MAX_NAME_CHARS} characters")
    out["kept_float"] = list(kept)
    scale: Any = value.get("output_scale")
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"certificate quantization output_scale must be a finite number > 0, got {str(scale)[:40]}")
    out["output_scale"] = float(scale)
    return out


def _fraction(value: Any, name: str) -> float:
    """A JSON number from 0 to 1 (an agreement, an accuracy, a drop in accuracy as a fraction)."""
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"certificate {name} must be a number from 0 to 1, got {str(value)[:40]}")
    return float(value)


def _finite(tolerance: Any, key: str) -> float:
    """``tolerance[key]``: a finite number >= 0 (NaN, infinity and ``1e400`` would make the self-test vacuous)."""
    value = tolerance[key]
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"certificate tolerance {key} must be a finite number >= 0, got {str(value)[:40]}")
    return float(value)


def read(metadata: Mapping[str, str]) -> Certificate | None:
    """The certificate in a model's metadata (``{key: value}``), or ``None`` if it has none."""
    text = metadata.get(METADATA_KEY)
    return None if text is None else Certificate.from_json(text)


def attach(model: Any, cert: Certificate) -> None:
    """Write ``cert`` into an ``onnx.ModelProto``'s ``metadata_props``, replacing an older one."""
    props = model.metadata_props
    for i in reversed(range(len(props))):
        if props[i].key == METADATA_KEY:
            del props[i]
    entry = props.add()
    entry.key = METADATA_KEY
    entry.value = cert.to_json()
