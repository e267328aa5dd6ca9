"""Serve one request end to end: find the version, decode, queue for a batch, encode.

The v1 ``:predict`` view turns ``{"instances": [...]}`` into one input batch and the logits
``z`` into ``softmax(z)_k = exp(z_k - max z) / sum_j exp(z_j - max z)`` (float64), labelled with
the certificate's ``class_labels`` (or the class index when there are none).

Before parsing, the JSON's size is checked against the limits and ``reserve(body bytes, JSON bytes)``
is called (the admission budget); JSON over :data:`OFFLOAD_BYTES` is decoded in a worker thread, so
the event loop keeps answering probes and small requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import codec
from service.errors import InvalidInput
from service.repository import ModelRepository

OFFLOAD_BYTES = codec.LARGE_JSON_BYTES  # JSON larger than this is decoded off the event loop (~1 ms of parsing)
Reserve = Callable[[int, int], None]


@dataclass(frozen=True)
class Encoded:
    """An encoded inference response; ``header_length`` is set when binary outputs follow the JSON."""

    body: bytes
    header_length: int | None


async def infer(repository: ModelRepository, name: str, version: str | None, body: bytes,
                header_length: str | None, limits: codec.Limits = codec.NO_LIMITS,
                reserve: Reserve | None = None) -> Encoded:
    """Run an Open Inference Protocol request. Raises :class:`~service.errors.ServiceError` subclasses."""
    entry = repository.get(name, version)
    with entry.lease() as (runtime, batcher):  # the version is not freed before this ends
        length = codec.parse_header_length(header_length, len(body))
        json_length = len(body) if length is None else length
        limits.check_json(json_length)
        if reserve is not None:
            reserve(len(body), json_length)
        if json_length > OFFLOAD_BYTES:
            request = await asyncio.get_running_loop().run_in_executor(
                None, codec.decode_infer_request, body, length, runtime.inputs, runtime.outputs, limits)
        else:
            request = codec.decode_infer_request(body, length, runtime.inputs, runtime.outputs, limits)
        feeds = request.inputs
        if len(feeds) > 1:  # the session's input order, so equal requests get equal batching keys
            feeds = {spec.name: feeds[spec.name] for spec in runtime.inputs}
        outputs = await batcher.submit(feeds)
        named = dict(zip(runtime.output_names, outputs, strict=True))
        payload, length = codec.encode_infer_response(name, str(entry.version), request, named, runtime.outputs)
        return Encoded(payload, length)


async def predict(repository: ModelRepository, name: str, version: str | None, body: bytes,
                  limits: codec.Limits = codec.NO_LIMITS, reserve: Reserve | None = None) -> list[dict[str, Any]]:
    """Classify ``{"instances": [...]}``: label, class index and probabilities per instance."""
    entry = repository.get(name, version)
    with entry.lease() as (runtime, batcher):  # the version is not freed before this ends
        if len(runtime.inputs) != 1:
            raise InvalidInput(f"':predict' needs a model with one input; {name!r} has "
                               f"{[s.name for s in runtime.inputs]}: use /v2/models/{name}/infer")
        limits.check_json(len(body))
        if reserve is not None:
            reserve(len(body), len(body))
        spec = runtime.inputs[0]
        if len(body) > OFFLOAD_BYTES:
            batch = await asyncio.get_running_loop().run_in_executor(None, _decode_instances, body, spec, limits)
        else:
            batch = _decode_instances(body, spec, limits)
        outputs = await batcher.submit({spec.name: batch})
        cert = entry.certificate
        index = runtime.output_names.index(cert.output_name) if cert and cert.output_name in runtime.output_names else 0
        logits = np.asarray(outputs[index], dtype=np.float64)
        if logits.ndim != 2 or logits.shape[0] != len(batch):
            raise InvalidInput(f"':predict' needs logits shaped [instances, classes]; output "
                               f"{runtime.output_names[index]!r} has shape {list(logits.shape)}")
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        labels = cert.class_labels if cert and len(cert.class_labels) == logits.shape[1] else \
            [str(k) for k in range(logits.shape[1])]
        best = probabilities.argmax(axis=1)
        return [{"label": labels[k], "class_index": int(k),
                 "probabilities": dict(zip(labels, row.tolist(), strict=True))}
                for k, row in zip(best.tolist(), probabilities, strict=True)]


def _decode_instances(body: bytes, spec: codec.TensorSpec, limits: codec.Limits) -> np.ndarray:
    parsed = codec.loads(body)
    instances = parsed.get("instances") if isinstance(parsed, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("request must be a JSON object with a non-empty 'instances' list")
    return codec.decode_instances(instances, spec, limits)
