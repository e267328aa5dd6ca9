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

The self-test vector is an input batch and the output the verified model produced for it, so
any runtime can re-check the artifact: run ``input`` and compare with ``output`` under
``tolerance`` (see :mod:`bnfold.tolerance`). Arrays are ``.npy`` bytes (dtype and shape
included, never pickled), zlib-compressed, base64-encoded. numpy and onnx only: the service
imports this module without torch.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnfold.tolerance import Comparison, Tolerance

METADATA_KEY = "bnfold.certificate"
FORMAT = "bnfold-certificate"
VERSION = 1


def encode_array(array: np.ndarray) -> str:
    """Encode an array compactly as base64(zlib(npy bytes))."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(zlib.compress(buf.getvalue(), 9)).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """Inverse of :func:`encode_array`. Raises ``ValueError`` on malformed text (never unpickles)."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
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
        """Parse a certificate. Raises ``ValueError`` naming what is missing or malformed."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"certificate is not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"certificate format must be {FORMAT!r}")
        if body.get("version") != VERSION:
            raise ValueError(f"certificate version {body.get('version')!r} is not supported (expected {VERSION})")
        try:
            tol = body["tolerance"]
            selftest = body["selftest"]
            return cls(
                input_name=str(body["input_name"]),
                output_name=str(body["output_name"]),
                selftest_input=decode_array(selftest["input"]),
                selftest_output=decode_array(selftest["output"]),
                tolerance=Tolerance(atol=float(tol["atol"]), rtol=float(tol["rtol"])),
                bnfold_version=str(body.get("bnfold_version", "")),
                source_sha256=str(body.get("source_sha256", "")),
                architecture=str(body.get("architecture", "")),
                input_shape=[int(d) for d in body.get("input_shape", [])],
                class_labels=[str(c) for c in body.get("class_labels", [])],
                folded=int(body.get("folded", 0)),
                kept=int(body.get("kept", 0)),
                errors=dict(body.get("errors", {})),
                batchnorm_nodes=_int_or_none(body.get("batchnorm_nodes")),
                opset=_int_or_none(body.get("opset")),
                exporter=str(body.get("exporter", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"certificate is missing or has a malformed field: {exc}") from exc

    def check(self, run: Callable[[np.ndarray], np.ndarray]) -> Comparison:
        """Run the self-test input through ``run`` and compare with the certified output."""
        return self.tolerance.compare(run(self.selftest_input), self.selftest_output)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


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
