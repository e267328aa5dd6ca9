"""Serve one request end to end: find the version, decode, queue for a batch, encode.

The v1 ``:predict`` view turns ``{"instances": [...]}`` into one input batch and the logits
``z`` into ``softmax(z)_k = exp(z_k - max z) / sum_j exp(z_j - max z)`` (float64), labelled with
the certificate's ``class_labels`` (or the class index when there are none).

Before parsing, the JSON's size is checked against the limits and ``reserve(body bytes, JSON bytes)``
is called (the admission budget); JSON over :data:`OFFLOAD_BYTES` is decoded in a worker thread, so
the event loop keeps answering probes and small requests meanwhile.

Each request runs as callbacks, not as a coroutine: :func:`infer_soon` and :func:`predict_soon`
decode on the caller's stack, queue for a batch (:meth:`service.batching.Batcher.enqueue`), and
encode when the batch answers, then hand the result (or the :class:`~service.errors.ServiceError`
that ended the request) to ``then``, exactly once. The HTTP direct path serves a request that way
with no task, no future and no ``await`` (one ``call_soon`` per batch, not per request; measured in
``benchmarks/results/serving.md``). :func:`infer` and :func:`predict` are the same steps, awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from service import codec
from service.batching import Batcher, Resolver
from service.errors import InvalidInput
from service.repository import ModelRepository, ModelVersion
from service.runtime import ModelRuntime

OFFLOAD_BYTES = codec.LARGE_JSON_BYTES  # JSON larger than this is decoded off the event loop (~1 ms of parsing)
Reserve = Callable[[int, int], None]
D = TypeVar("D")
Then = Callable[[Any], None]  # gets the result, or the exception that ended the request
# How an inference response is built from (model name, version, request, named outputs, output specs).
Encoder = Callable[[str, str, codec.InferRequest, dict[str, np.ndarray], Sequence[codec.TensorSpec]], Any]


class Encoded:
    """An encoded inference response; ``header_length`` is set when binary outputs follow the JSON."""

    __slots__ = ("body", "header_length")  # a plain slotted class: built once per request

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self.body = body
        self.header_length = header_length


def encode_http(model_name: str, model_version: str, request: codec.InferRequest, outputs: dict[str, np.ndarray],
                specs: Sequence[codec.TensorSpec]) -> Encoded:
    """The HTTP body of an Open Inference Protocol response (:func:`codec.encode_infer_response`)."""
    return Encoded(*codec.encode_infer_response(model_name, model_version, request, outputs, specs))


class _Flow(Generic[D]):
    """One request on a leased version: ``decode()``, ``feeds(decoded)`` into the batcher, ``encode(decoded,
    outputs)``; ``then`` gets the encoded result or the exception, once, after the lease is returned."""

    __slots__ = ("batcher", "decode", "decoded", "encode", "entry", "feeds", "then")

    def __init__(self, entry: ModelVersion, batcher: Batcher, decode: Callable[[], D],
                 feeds: Callable[[D], dict[str, np.ndarray]], encode: Callable[[D, list[np.ndarray]], Any],
                 then: Then) -> None:
        self.entry = entry
        self.batcher = batcher
        self.decode = decode
        self.feeds = feeds
        self.encode = encode
        self.then = then
        self.decoded: D | None = None

    def start(self, offload: bool) -> None:
        """Decode here, or in a worker thread when ``offload``; then queue for a batch."""
        try:
            if offload:
                asyncio.get_running_loop().run_in_executor(None, self.decode).add_done_callback(self._decoded)
                return
            decoded = self.decode()
        except Exception as exc:
            self._finish(exc)
            return
        self._submit(decoded)

    def _decoded(self, future: asyncio.Future[D]) -> None:
        # future.exception(), not a raising future.result(): re-raised here, the exception's traceback would
        # take this frame, whose ``future`` holds the exception, a cycle keeping the parsed JSON alive until a GC.
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            self._finish(error)
            return
        self._submit(future.result())

    def _submit(self, decoded: D) -> None:
        self.decoded = decoded
        try:
            self.batcher.enqueue(self.feeds(decoded), self._ran)
        except Exception as exc:  # queue full, batcher failed
            self._finish(exc)

    def _ran(self, outputs: list[np.ndarray] | BaseException) -> None:
        if isinstance(outputs, BaseException):
            self._finish(outputs)
            return
        try:
            result = self.encode(self.decoded, outputs)  # type: ignore[arg-type]
        except Exception as exc:
            result = exc
        self.decoded = None
        self._finish(result)

    def _finish(self, result: Any) -> None:
        self.entry.release()
        then, self.then = self.then, _answered  # once; and an error's traceback, which reaches this frame, no
        then(result)  # longer leads back to the caller's callback (and what it holds) through this flow


def infer_soon(repository: ModelRepository, name: str, version: str | None, body: bytes, header_length: str | None,
               limits: codec.Limits, reserve: Reserve | None, then: Then, encode: Encoder = encode_http) -> None:
    """Run an Open Inference Protocol request; ``then`` gets ``encode(...)`` (an :class:`Encoded`) or the error.

    Errors found before the request is queued (unknown version, bad header length, over a limit) are
    raised here and ``then`` is not called; later ones (decoding, the run, encoding) go to ``then``.
    """
    entry = repository.get(name, version)
    runtime, batcher = entry.acquire()  # returned by _Flow._finish, or below when this raises
    try:
        length = codec.parse_header_length(header_length, len(body))
        json_length = len(body) if length is None else length
        limits.check_json(json_length)
        if reserve is not None:
            reserve(len(body), json_length)
    except BaseException:
        entry.release()
        raise

    decoder = runtime.decoder(limits)

    def decode() -> codec.InferRequest:
        return decoder.decode(body, length)

    def encoded(request: codec.InferRequest, outputs: list[np.ndarray]) -> Any:
        named = dict(zip(runtime.output_names, outputs, strict=True))
        return encode(name, str(entry.version), request, named, runtime.outputs)

    _Flow(entry, batcher, decode, _inputs, encoded, then).start(json_length > OFFLOAD_BYTES)


def predict_soon(repository: ModelRepository, name: str, version: str | None, body: bytes, limits: codec.Limits,
                 reserve: Reserve | None, then: Then) -> None:
    """Classify ``{"instances": [...]}``; ``then`` gets label, class index and probabilities per instance.

    Raises (and does not call ``then``) as :func:`infer_soon` does.
    """
    entry = repository.get(name, version)
    runtime, batcher = entry.acquire()
    try:
        if len(runtime.inputs) != 1:
            raise InvalidInput(f"':predict' needs a model with one input; {name!r} has "
                               f"{[s.name for s in runtime.inputs]}: use /v2/models/{name}/infer")
        limits.check_json(len(body))
        if reserve is not None:
            reserve(len(body), len(body))
    except BaseException:
        entry.release()
        raise
    spec = runtime.inputs[0]

    def classified(batch: np.ndarray, outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        return _classify(entry, runtime, len(batch), outputs)

    _Flow(entry, batcher, lambda: _decode_instances(body, spec, limits), lambda batch: {spec.name: batch},
          classified, then).start(len(body) > OFFLOAD_BYTES)


async def infer(repository: ModelRepository, name: str, version: str | None, body: bytes,
                header_length: str | None, limits: codec.Limits = codec.NO_LIMITS,
                reserve: Reserve | None = None, encode: Encoder = encode_http) -> Any:
    """:func:`infer_soon`, awaited: the :class:`Encoded` response (or ``encode``'s). Raises
    :class:`~service.errors.ServiceError` subclasses."""
    return await _awaited(lambda then: infer_soon(repository, name, version, body, header_length, limits, reserve,
                                                  then, encode))


async def predict(repository: ModelRepository, name: str, version: str | None, body: bytes,
                  limits: codec.Limits = codec.NO_LIMITS, reserve: Reserve | None = None) -> list[dict[str, Any]]:
    """:func:`predict_soon`, awaited."""
    result: list[dict[str, Any]] = await _awaited(
        lambda then: predict_soon(repository, name, version, body, limits, reserve, then))
    return result


async def _awaited(start: Callable[[Then], None]) -> Any:
    """Call ``start(then)`` and await what ``then`` gets (raised when an exception).

    Neither this frame nor the callback keeps the future once it is resolved: an error's traceback
    reaches both, and a future held there (holding that error) would close a cycle that keeps the
    request's data alive until a GC pass.
    """
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    start(Resolver(future))
    try:
        return await future
    finally:
        del future


def _answered(result: Any) -> None:
    """What a finished flow's ``then`` becomes."""


def _inputs(request: codec.InferRequest) -> dict[str, np.ndarray]:
    """A decoded request's feeds: its inputs, in the session's order (:class:`codec.Decoder`'s), so that equal
    requests get equal batching keys."""
    return request.inputs


def _classify(entry: ModelVersion, runtime: ModelRuntime, instances: int,
              outputs: list[np.ndarray]) -> list[dict[str, Any]]:
    cert = entry.certificate
    index = runtime.output_names.index(cert.output_name) if cert and cert.output_name in runtime.output_names else 0
    logits = np.asarray(outputs[index], dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != instances:
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
