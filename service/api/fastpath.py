"""The inference endpoints as one lean ASGI handler, dispatched before FastAPI's request machinery.

``POST /v2/models/{name}/infer``, ``POST /v2/models/{name}/versions/{version}/infer`` (Open Inference
Protocol, JSON or binary tensor data) and ``POST /v1/models/{name}:predict`` (KServe v1 style) are not
FastAPI routes, for measured speed: under ``benchmarks/serving.py``'s load (cnn, batch-1 requests,
32 connections, one CPU) py-spy put 56% of the event loop's time in FastAPI/Starlette (middleware
stack, route scan, dependency solving, Request/Response objects) and 14% in uvicorn, for ~0.01 ms of
onnxruntime per request. :class:`ServiceApp` hands a ``POST`` whose path matches one of these routes
straight to :class:`InferenceEndpoints` (one regex match, one header scan, the body read, two
``send`` calls); everything else, and any other method on these paths (405), goes through FastAPI,
whose router holds the same handler as raw Starlette routes.

Behaviour is that of the FastAPI routes it replaces: the same API-key check
(:func:`service.api.deps.check_api_key`, before the body is read), the same body limits
(:mod:`service.api.body`), ``{"error": ...}`` bodies with the same statuses and headers, the same
metrics, 500 ``{"error": "internal server error"}`` for a bug. :func:`openapi_paths` documents the
routes in the OpenAPI schema.

:meth:`InferenceEndpoints.answer` is the handler of both paths into it: the ASGI one above, and
:mod:`service.protocol`'s direct path (:meth:`ServiceApp.direct_route`), which hands over a small
body it read whole already and skips ASGI altogether.

Admission (:mod:`service.api.admission`) costs O(1) per request: the request takes its share of the
worker's byte budget as it reads and decodes (503 + ``Retry-After`` past ``max_inflight_bytes``),
and registers for its deadline (504 past ``request_timeout_s``, 408 if the body was still arriving).
An error answered before the body was read closes the connection, so the rest of it is not read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from service import codec, inference
from service.api.admission import TRIM_BYTES, Budget, Deadlines, Share, trim_soon
from service.api.body import ClientGone, read_body
from service.api.deps import Service, check_api_key, check_names
from service.api.errors import OUTCOME, STATUS, http_error
from service.api.schemas import Predictions
from service.errors import ServiceError
from service.logs import event
from service.metrics import UNKNOWN_MODEL
from service.protocol import Answer, DirectHandler

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # ASGI header names are lower-case bytes
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
PREDICT = "/v1/models/{name}:predict"
# Path templates as Starlette compiles them (a parameter is one non-empty path segment).
PATTERNS = [(re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), path)
            for path in (INFER, INFER_VERSION, PREDICT)]
_JSON = [(b"content-type", b"application/json")]
_CLOSE = (b"connection", b"close")


class InferenceEndpoints:
    """The ASGI handler of the inference routes; ``scope["path_params"]`` holds ``name`` (and ``version``)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        settings = service.settings
        self.limits = codec.Limits(settings.max_request_rows, settings.max_tensor_elements, settings.max_tensor_bytes,
                                   settings.max_json_bytes)
        self.budget = Budget(settings.max_inflight_bytes)
        self.deadlines = Deadlines(settings.request_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self.answer(scope["path"], scope["path_params"], scope["headers"], receive=receive)
        if answer is not None:
            status, payload, extra = answer
            await _send(send, status, payload, extra)

    async def answer(self, path: str, params: dict[str, str], raw_headers: list[tuple[bytes, bytes]],
                     body: bytes | None = None, *, receive: Receive | None = None) -> Answer | None:
        """Status, body and extra headers of the answer to one request; ``None`` when the client left.

        The body comes from ``receive`` (read with the limits of :mod:`service.api.body`), or is ``body``:
        one that the HTTP protocol read whole already (:mod:`service.protocol`'s direct path: at most
        ``max_body_bytes``, identity encoding), taken from the byte budget here. With ``body`` given,
        this is a :data:`service.protocol.DirectHandler`.
        """
        headers: dict[bytes, bytes] = {}
        for key, value in raw_headers:  # names arrive lower-cased; the first of a repeated header wins
            headers.setdefault(key, value)
        service = self.service
        task = asyncio.current_task()
        deadlines = self.deadlines
        deadlines.add(task, time.monotonic())  # type: ignore[arg-type]
        share = Share(self.budget)
        read = body is not None
        try:
            check_api_key(service.settings, headers.get(b"authorization", b""))
            try:
                if body is None:
                    assert receive is not None
                    body = await read_body(receive, headers.get(b"content-length"), headers.get(b"content-encoding"),
                                           service.settings.max_body_bytes, share)
                else:
                    share.take(len(body))
            except ServiceError as exc:  # the budget is full
                raise http_error(exc, service.settings.retry_after_s) from None
            read = True
            payload, extra = await self._run(path.endswith(":predict"), params["name"], params.get("version"), body,
                                             headers, share)
            deadlines.remove(task)  # type: ignore[arg-type]
            return 200, payload, extra
        except HTTPException as exc:
            service.metrics.http_error(exc.status_code)
            return exc.status_code, orjson.dumps({"error": str(exc.detail)}), \
                [*_JSON, *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()),
                 *(() if read else (_CLOSE,))]
        except ClientGone:
            return None
        except asyncio.CancelledError:
            if not deadlines.missed(task):  # type: ignore[arg-type]
                raise  # the server is shutting down
            status = 504 if read else 408
            service.metrics.http_error(status)
            return status, orjson.dumps({"error": late_message(read, deadlines.timeout_s)}), [*_JSON, _CLOSE]
        except Exception as exc:  # a bug: the same answer and log line as FastAPI's handler for the other routes
            event(logging.ERROR, "internal error", path=path, error=f"{type(exc).__name__}: {exc}")
            return 500, b'{"error":"internal server error"}', _JSON
        finally:
            deadlines.remove(task)  # type: ignore[arg-type]
            if share.held >= TRIM_BYTES:  # a large request: its memory goes back to the OS, not just to malloc
                trim_soon()
            share.release()

    async def _run(self, predict: bool, name: str, version: str | None, body: bytes,
                   headers: dict[bytes, bytes], share: Share) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """Body and extra headers of a successful answer; service errors become :class:`HTTPException`."""
        service = self.service
        start = time.perf_counter()
        repository = service.repository
        label = name if name in repository.models else UNKNOWN_MODEL
        try:
            check_names(repository, name, version)
            if predict:
                rows = await inference.predict(repository, name, None, body, self.limits, share.take_decoding)
                result = (orjson.dumps({"predictions": rows}), _JSON)
            else:
                length = headers.get(_HEADER_LENGTH_KEY)
                encoded = await inference.infer(repository, name, version, body,
                                                None if length is None else length.decode("latin-1"),
                                                self.limits, share.take_decoding)
                result = (encoded.body, _JSON) if encoded.header_length is None else \
                    (encoded.body, [(b"content-type", b"application/octet-stream"),
                                    (_HEADER_LENGTH_KEY, str(encoded.header_length).encode())])
        except ServiceError as exc:
            service.metrics.request(label, OUTCOME.get(STATUS.get(type(exc), 500), "error"))
            # Raised without a local name: a local holding it would close a reference cycle (exception ->
            # traceback -> this frame -> exception) that keeps the request's parsed data alive until a GC pass.
            raise http_error(exc, service.settings.retry_after_s) from None
        service.metrics.request(label, "success", time.perf_counter() - start)
        return result


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def late_message(read: bool, timeout_s: float) -> str:
    """The error of a request past its deadline: 504 once its body was read, 408 while it still arrived."""
    what = "did not finish" if read else "body did not arrive"
    return f"the request {what} within {timeout_s:g} s (BNFOLD_REQUEST_TIMEOUT_S)"


def match_inference(path: str) -> dict[str, str] | None:
    """The path parameters when ``path`` (without the root path) is an inference route, else ``None``."""
    if path.endswith(("/infer", ":predict")):
        for pattern, _ in PATTERNS:
            match = pattern.match(path)
            if match:
                return match.groupdict()
    return None


def routes(endpoints: InferenceEndpoints) -> list[BaseRoute]:
    """The same handler as Starlette routes, for FastAPI's router (405 for other methods, trailing-slash redirects)."""
    return [Route(path, endpoints, methods=["POST"]) for _, path in PATTERNS]


class ServiceApp(FastAPI):
    """FastAPI, with ``POST`` to the inference routes dispatched to :attr:`endpoints` before FastAPI's machinery."""

    endpoints: InferenceEndpoints | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoints = self.endpoints
        if endpoints is not None and scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            root = scope.get("root_path", "")
            params = match_inference(path[len(root):] if root and path.startswith(root) else path)
            if params is not None:
                scope["path_params"] = params
                scope["app"] = self
                await endpoints(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def direct_route(self, path: str) -> tuple[DirectHandler, dict[str, str]] | None:
        """The handler and path parameters of a ``POST`` to ``path`` that :mod:`service.protocol` may serve
        without ASGI (a body read whole already), or ``None``: then the request goes through :meth:`__call__`."""
        endpoints = self.endpoints
        if endpoints is None:
            return None
        params = match_inference(path)
        return None if params is None else (endpoints.answer, params)

    @property
    def direct_timeout_s(self) -> float | None:
        """The request deadline (``request_timeout_s``), which :mod:`service.protocol` applies to a direct
        request's body while it arrives (the handler's own deadline starts once it has it)."""
        endpoints = self.endpoints
        return None if endpoints is None else endpoints.deadlines.timeout_s

    def direct_late(self) -> str:
        """Count the 408 of a direct request whose body missed its deadline; the ASGI path's error message."""
        endpoints = self.endpoints
        assert endpoints is not None  # direct_timeout_s was not None
        endpoints.service.metrics.http_error(408)
        return late_message(False, endpoints.deadlines.timeout_s)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema of the other routes, plus :func:`openapi_paths` (built once, then cached)."""
        if self.openapi_schema is None:
            schema = super().openapi()  # caches itself in self.openapi_schema: extend it in place
            schema["paths"] = {**openapi_paths(schema.setdefault("components", {}).setdefault("schemas", {})),
                               **schema.get("paths", {})}
            return schema
        return self.openapi_schema


def openapi_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI path items of the inference routes; adds the schemas they reference to ``schemas``."""
    predictions = Predictions.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(predictions.pop("$defs", {}))
    schemas["Predictions"] = predictions
    error = {"content": {"application/json": {"schema": {"type": "object", "properties": {
        "error": {"type": "string"}}, "required": ["error"]}}}}
    errors = {"400": {"description": "malformed request or it does not fit the model", **error},
              "401": {"description": "missing or wrong API key (when one is set)", **error},
              "404": {"description": "unknown model or version", **error},
              "408": {"description": "the body did not arrive in time", **error},
              "413": {"description": "request over a size limit (body, JSON, rows, elements, bytes)", **error},
              "503": {"description": "not ready, or overloaded (with Retry-After)", **error},
              "504": {"description": "the request missed its deadline", **error}}
    oip = {"content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}

    def infer(summary: str, parameters: list[dict[str, Any]], operation: str) -> dict[str, Any]:
        return {"post": {"tags": ["inference"], "summary": summary, "operationId": operation,
                         "parameters": parameters, "requestBody": {"required": True, **oip},
                         "responses": {"200": {"description": "outputs (JSON, or binary tensor data after a "
                                                              f"JSON header of {HEADER_LENGTH} bytes)", **oip},
                                       **errors}}}

    return {
        INFER: infer("Run inference on the newest version", [name], "infer"),
        INFER_VERSION: infer("Run inference on one version", [name, version], "infer_version"),
        PREDICT: {"post": {
            "tags": ["inference"], "operationId": "predict",
            "summary": "Classify each instance with the newest version: label, class index, softmax probabilities",
            "parameters": [name],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"instances": {"type": "array"}}, "required": ["instances"]}}}},
            "responses": {"200": {"description": "one prediction per instance", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Predictions"}}}}, **errors}}},
    }
