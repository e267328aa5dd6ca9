"""Serve one request end to end: find the version, decode, queue for a batch, encode.

The v1 ``:predict`` view turns ``{"instances": [...]}`` into one input batch and the logits
``z`` into ``softmax(z)_k = exp(z_k - max z) / sum_j exp(z_j - max z)`` (float64), labelled with
the certificate's ``class_labels`` (or the class index when there are none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service import codec
from service.errors import InvalidInput
from service.repository import ModelRepository


@dataclass(frozen=True)
class Encoded:
    """An encoded inference response; ``header_length`` is set when binary outputs follow the JSON."""

    body: bytes
    header_length: int | None


async def infer(repository: ModelRepository, name: str, version: str | None, body: bytes,
                header_length: str | None) -> Encoded:
    """Run an Open Inference Protocol request. Raises :class:`~service.errors.ServiceError` subclasses."""
    entry = repository.get(name, version)
    runtime, batcher = entry.serving()
    request = codec.decode_infer_request(body, codec.parse_header_length(header_length, len(body)),
                                         runtime.inputs, runtime.outputs)
    feeds = request.inputs
    if len(feeds) > 1:  # the session's input order, so equal requests get equal batching keys
        feeds = {spec.name: feeds[spec.name] for spec in runtime.inputs}
    outputs = await batcher.submit(feeds)
    named = dict(zip(runtime.output_names, outputs, strict=True))
    payload, length = codec.encode_infer_response(name, str(entry.version), request, named, runtime.outputs)
    return Encoded(payload, length)


async def predict(repository: ModelRepository, name: str, version: str | None, body: bytes) -> list[dict[str, Any]]:
    """Classify ``{"instances": [...]}``: label, class index and probabilities per instance."""
    entry = repository.get(name, version)
    runtime, batcher = entry.serving()
    if len(runtime.inputs) != 1:
        raise InvalidInput(f"':predict' needs a model with one input; {name!r} has "
                           f"{[s.name for s in runtime.inputs]}: use /v2/models/{name}/infer")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    instances = parsed.get("instances") if isinstance(parsed, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("request must be a JSON object with a non-empty 'instances' list")
    spec = runtime.inputs[0]
    batch = codec.decode_instances(instances, spec)
    outputs = await batcher.submit({spec.name: batch})
    cert = entry.certificate
    index = runtime.output_names.index(cert.output_name) if cert and cert.output_name in runtime.output_names else 0
    logits = np.asarray(outputs[index], dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != len(instances):
        raise InvalidInput(f"':predict' needs logits shaped [instances, classes]; output "
                           f"{runtime.output_names[index]!r} has shape {list(logits.shape)}")
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    labels = cert.class_labels if cert and len(cert.class_labels) == logits.shape[1] else \
        [str(k) for k in range(logits.shape[1])]
    best = probabilities.argmax(axis=1)
    return [{"label": labels[k], "class_index": int(k), "probabilities": dict(zip(labels, row.tolist(), strict=True))}
            for k, row in zip(best.tolist(), probabilities, strict=True)]
