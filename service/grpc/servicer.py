"""The RPCs of ``inference.GRPCInferenceService``, on ``grpc.aio``, over the HTTP side's service objects.

Implemented: ``ServerLive``, ``ServerReady`` (no API key, like the HTTP health probes),
``ServerMetadata``, ``ModelReady``, ``ModelMetadata``, ``ModelConfig`` (what Triton clients read
to build requests: every input and output with its full shape, batch dimension included, hence
``max_batch_size`` 0), ``ModelInfer``, ``ModelStreamInfer`` (each request of the stream in turn,
an error in that response's ``error_message`` as Triton does) and the repository RPCs
(``RepositoryIndex``, ``RepositoryModelLoad``, ``RepositoryModelUnload``, through
:mod:`service.control`). Every other RPC of the service (statistics, shared memory, trace and log
settings) answers ``UNIMPLEMENTED`` naming itself.

``ModelInfer`` follows the HTTP inference endpoint step by step (:mod:`service.api.fastpath`,
:func:`service.inference.infer`): the API key from the ``authorization`` metadata key (``Bearer
<key>``, constant-time comparison), a share of the worker's byte budget before decoding (503 ->
``UNAVAILABLE`` with ``retry-after`` trailing metadata), the request decoded by the codec
(:mod:`service.grpc.tensors`), queued on the version's batcher, and ``BNFOLD_REQUEST_TIMEOUT_S``
from its start (``DEADLINE_EXCEEDED``; a shorter client deadline is gRPC's own). Requests are
counted in ``bnfold_requests`` like HTTP ones; errors in ``bnfold_grpc_errors`` by code.
``ModelReady`` answers ``ready: false`` for a model it does not know, as Triton does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NoReturn

import grpc
from fastapi import HTTPException
from prometheus_client import Counter
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bnfold._version import __version__
from service import codec, inference
from service.api.admission import TRIM_BYTES, Budget, Deadlines, Share, trim_soon
from service.api.deps import Service, check_api_key, check_names
from service.api.errors import OUTCOME, STATUS
from service.api.routes import repository as repository_routes
from service.api.routes.server import EXTENSIONS
from service.errors import ServiceError
from service.grpc import tensors
from service.grpc.status import code_of, status_of
from service.logs import event
from service.metrics import UNKNOWN_MODEL
from service.repository import ModelVersion

PLATFORM = "onnxruntime_onnx"
# Protocol datatype -> model_config's DataType, for ModelConfig.
CONFIG_TYPES: dict[str, int] = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}
IMPLEMENTED = {"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
               "ModelInfer", "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


class Abort(Exception):
    """Ends an RPC with ``code`` and ``message`` (raised inside the handlers, answered by :meth:`Servicer._abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service's RPCs over ``service`` (repository, settings, metrics) and the HTTP side's ``budget``."""

    def __init__(self, service: Service, budget: Budget) -> None:
        self.service = service
        settings = service.settings
        self.limits = codec.Limits(settings.max_request_rows, settings.max_tensor_elements, settings.max_tensor_bytes,
                                   settings.max_json_bytes)
        self.budget = budget
        self.deadlines = Deadlines(settings.request_timeout_s)
        self.errors = Counter("bnfold_grpc_errors", "gRPC error answers by status code (auth, limits, routing too)",
                              ["code"], registry=service.metrics.registry)
        self._errors: dict[grpc.StatusCode, Any] = {}

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.repository.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        return pb.ServerMetadataResponse(name="bnfold", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        try:
            entry = self._entry(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        entry = await self._guarded(context, self._entry, request.name, request.version)
        runtime = entry.runtime
        specs = (runtime.inputs, runtime.outputs) if runtime is not None else ((), ())
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in self.service.repository.models[request.name]],
            platform=PLATFORM, inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs[0]],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs[1]])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        entry = await self._guarded(context, self._entry, request.name, request.version)
        runtime = entry.runtime
        config = mc.ModelConfig(name=request.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=0)
        if runtime is not None:
            config.input.extend(mc.ModelInput(name=s.name, data_type=CONFIG_TYPES.get(s.datatype, mc.TYPE_INVALID),
                                              dims=s.shape) for s in runtime.inputs)
            config.output.extend(mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES.get(s.datatype, mc.TYPE_INVALID),
                                                dims=s.shape) for s in runtime.outputs)
        return pb.ModelConfigResponse(config=config)

    def _entry(self, name: str, version: str) -> ModelVersion:
        repository = self.service.repository
        check_names(repository, name, version or None)
        return repository.get(name, version or None)

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        try:
            return await self._serve(request)
        except Abort as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                context.set_trailing_metadata((("retry-after", str(self.service.settings.retry_after_s)),))
            await self._abort(context, exc.code, exc.message)

    async def ModelStreamInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """Each request of the stream in turn; an error is that response's ``error_message`` (as Triton)."""
        await self._authorize(context)
        async for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._serve(request))
            except Abort as exc:
                self._count(exc.code)
                yield pb.ModelStreamInferResponse(error_message=exc.message, infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id))

    async def _serve(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One inference request with its deadline, budget share and metrics. Raises :class:`Abort`."""
        service = self.service
        start = time.perf_counter()
        name = request.model_name
        label = name if name in service.repository.models else UNKNOWN_MODEL
        task = asyncio.current_task()
        assert task is not None  # a gRPC handler runs in a task
        deadlines = self.deadlines
        deadlines.add(task, time.monotonic())
        share = Share(self.budget)
        try:
            share.take(request.ByteSize())  # the message as received, held until the answer
            response = await self._infer(request, share)
            deadlines.remove(task)
        except ServiceError as exc:
            service.metrics.request(label, OUTCOME.get(STATUS.get(type(exc), 500), "error"))
            code, message = status_of(exc)
            raise Abort(code, message) from None
        except asyncio.CancelledError:
            if not deadlines.missed(task):
                raise  # the client went away, or the server stops
            service.metrics.request(label, "timeout")
            raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request did not finish within "
                        f"{deadlines.timeout_s:g} s (BNFOLD_REQUEST_TIMEOUT_S)") from None
        except Exception as exc:  # a bug: the HTTP side's answer and log line, never the exception's text
            event(logging.ERROR, "internal error", rpc="ModelInfer", error=f"{type(exc).__name__}: {exc}")
            raise Abort(grpc.StatusCode.INTERNAL, "internal server error") from None
        finally:
            deadlines.remove(task)
            if share.held >= TRIM_BYTES:
                trim_soon()
            share.release()
        service.metrics.request(label, "success", time.perf_counter() - start)
        return response

    async def _infer(self, request: pb.ModelInferRequest, share: Share) -> pb.ModelInferResponse:
        """:func:`service.inference.infer`, with a gRPC request and response."""
        repository = self.service.repository
        name, version = request.model_name, request.model_version or None
        check_names(repository, name, version)
        repository.get(name, version).serving()  # an unknown or unready version answers before a malformed request
        body, header_length = tensors.as_http(request)
        response: pb.ModelInferResponse = await inference.infer(
            repository, name, version, body, None if header_length is None else str(header_length), self.limits,
            share.take_decoding, encode=tensors.response)
        return response

    # -- repository extension ----------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        entries = self.service.control.index(ready_only=request.ready)
        model = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[model(name=e.name, version=e.version, state=e.state, reason=e.reason)
                                                  for e in entries])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        await self._control(context, request.parameters, {}, self.service.control.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        await self._control(context, request.parameters, {"unload_dependents": bool}, self.service.control.unload,
                            request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, context: grpc.aio.ServicerContext, parameters: Any, allowed: dict[str, type],
                       call: Any, name: str) -> None:
        """``await call(name)`` after the HTTP route's parameter check, errors answered as their status."""
        try:  # the HTTP route's own check, so the messages are the same
            repository_routes._parameters({"parameters": {k: tensors.parameter(v) for k, v in parameters.items()}},
                                          allowed)
        except HTTPException as exc:
            await self._abort(context, code_of(exc.status_code), str(exc.detail))
        try:
            await call(name)
        except ServiceError as exc:
            code, message = status_of(exc)
            await self._abort(context, code, message)
        except Exception as exc:  # a bug: logged, answered without the exception's text
            event(logging.ERROR, "internal error", rpc="repository control", model=name[:100],
                  error=f"{type(exc).__name__}: {exc}")
            await self._abort(context, grpc.StatusCode.INTERNAL, "internal server error")

    # -- helpers -------------------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """:func:`check_api_key` on the ``authorization`` metadata; ``UNAUTHENTICATED`` with its message."""
        settings = self.service.settings
        if settings.api_key is None:
            return
        value = b""
        for key, item in context.invocation_metadata() or ():
            if key == "authorization":
                value = item.encode("latin-1", "replace") if isinstance(item, str) else item
                break
        try:
            check_api_key(settings, value)
        except HTTPException as exc:
            await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc.detail))

    async def _guarded(self, context: grpc.aio.ServicerContext, call: Any, *args: Any) -> Any:
        """``call(*args)``, its :class:`ServiceError` answered as the matching status."""
        try:
            return call(*args)
        except ServiceError as exc:
            code, message = status_of(exc)
            await self._abort(context, code, message)

    def _count(self, code: grpc.StatusCode) -> None:
        counter = self._errors.get(code)
        if counter is None:
            counter = self._errors[code] = self.errors.labels(code.name)
        counter.inc()

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        self._count(code)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # it always raises


def _unimplemented(method: str) -> Any:
    async def handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._abort(context, grpc.StatusCode.UNIMPLEMENTED, f"bnfold does not implement {method}")
    handler.__name__ = method
    return handler


for _method in dir(pb_grpc.GRPCInferenceServiceServicer):
    if not _method.startswith("_") and _method not in IMPLEMENTED:
        setattr(Servicer, _method, _unimplemented(_method))
