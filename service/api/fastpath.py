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

Two paths lead in: the ASGI one above (:meth:`InferenceEndpoints.answer`, which reads the body), and
:mod:`service.protocol`'s direct path (:meth:`ServiceApp.direct_route`, :meth:`InferenceEndpoints.serve`),
which hands over a small body it read whole already and skips ASGI altogether. Both then run the
same :class:`_Call`: the request is decoded and queued on the caller's stack, and answered from its
batch's callback (:func:`service.inference.infer_soon`), so a direct request costs no task, future
or ``await``; every error, the deadline's 504 included, is answered by the call itself.

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
from service.batching import Resolver
from service.errors import ServiceError
from service.logs import event
from service.metrics import UNKNOWN_MODEL
from service.protocol import Answer, DirectHandler, Respond

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # ASGI header names are lower-case bytes
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
PREDICT = "/v1/models/{name}:predict"
# Path templates as Starlette compiles them (a parameter is one non-empty path segment).
PATTERNS = [(re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), path)
            for path in (INFER, INFER_VERSION, PREDICT)]
_JSON = [(b"content-type", b"application/json")]
_BINARY = (b"content-type", b"application/octet-stream")
_CLOSE = (b"connection", b"close")
_INTERNAL_ERROR: Answer = (500, b'{"error":"internal server error"}', _JSON)


class InferenceEndpoints:
    """The ASGI handler of the inference routes; ``scope["path_params"]`` holds ``name`` (and ``version``)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        settings = service.settings
        self.limits = codec.Limits(settings.max_request_rows, settings.max_tensor_elements, settings.max_tensor_bytes,
                                   settings.max_json_bytes)
        self.budget = Budget(settings.max_inflight_bytes)
        self.deadlines = Deadlines(settings.request_timeout_s)
        self.direct_routes: dict[str, tuple[DirectHandler, dict[str, str]] | None] = {}  # ServiceApp.direct_route's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self.answer(scope["path"], scope["path_params"], scope["headers"], receive)
        if answer is not None:
            status, payload, extra = answer
            await _send(send, status, payload, extra)

    def serve(self, path: str, params: dict[str, str], raw_headers: list[tuple[bytes, bytes]], body: bytes,
              respond: Respond) -> None:
        """Answer a request whose body the HTTP protocol read whole already, through ``respond`` (once).

        :mod:`service.protocol`'s direct path (a :data:`service.protocol.DirectHandler`): at most
        ``max_body_bytes``, identity encoding. Returns at once; the answer comes when its batch ran.
        """
        call = _Call(self, path, params, raw_headers, respond)
        if call.authorized(read=True):
            call.run(body, take=True)

    async def answer(self, path: str, params: dict[str, str], raw_headers: list[tuple[bytes, bytes]],
                     receive: Receive) -> Answer | None:
        """Status, body and extra headers of the answer to an ASGI request; ``None`` when the client left.

        The body comes from ``receive``, read with the limits of :mod:`service.api.body`; the rest is
        :meth:`serve`'s. Past the deadline while the body still arrives, this task is cancelled: 408.
        """
        answered: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        call = _Call(self, path, params, raw_headers, Resolver(answered))
        task = call.task = asyncio.current_task()
        settings = self.service.settings
        try:
            if call.authorized(read=False):
                body = await read_body(receive, call.headers.get(b"content-length"),
                                       call.headers.get(b"content-encoding"), settings.max_body_bytes, call.share)
                call.task = None
                call.run(body, take=False)
        except ClientGone:
            call.answer(None)
        except ServiceError as exc:  # the budget is full
            call.refuse(http_error(exc, settings.retry_after_s), read=False)
        except HTTPException as exc:  # the body's framing, encoding or size
            call.refuse(exc, read=False)
        except asyncio.CancelledError:
            if not call.late:  # the server is shutting down
                call.answer(None)
                raise
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11: the cancellation is handled
            if uncancel is not None:
                uncancel()
            call.late_answer(read=False)
        except Exception as exc:  # a bug
            call.failed(exc)
        return await answered  # a cancellation here (shutdown) leaves the call to finish and give its share back


class _Call:
    """One inference request from its headers to its answer, which ``respond`` gets exactly once.

    It is its own entry in :class:`Deadlines` (:meth:`done`, :meth:`cancel`), holds the request's
    :class:`Share` of the byte budget until the answer, and maps every error to the answer FastAPI's
    routes would give: ``{"error": ...}`` with the status of :mod:`service.api.errors`, 500 for a bug.
    """

    __slots__ = ("answered", "endpoints", "headers", "label", "late", "params", "path", "respond", "share", "started",
                 "task")

    def __init__(self, endpoints: InferenceEndpoints, path: str, params: dict[str, str],
                 raw_headers: list[tuple[bytes, bytes]], respond: Respond) -> None:
        # Names arrive lower-cased; the first of a repeated header wins (the last write of the reversed list).
        headers = dict(reversed(raw_headers if isinstance(raw_headers, list | tuple) else list(raw_headers)))
        self.endpoints = endpoints
        self.path = path
        self.params = params
        self.headers = headers
        self.respond = respond
        self.share = Share(endpoints.budget)
        self.answered = False
        self.late = False  # its deadline passed
        self.task: asyncio.Task[Any] | None = None  # the ASGI task while it reads the body
        self.label = UNKNOWN_MODEL
        self.started = 0.0
        endpoints.deadlines.add(self, time.monotonic())

    # -- Deadlines' entry ----------------------------------------------------------------------

    def done(self) -> bool:
        return self.answered

    def cancel(self) -> None:
        """The deadline passed: 504, or (the body still arriving) cancel the task reading it, which answers 408."""
        self.late = True
        if self.task is not None:
            self.task.cancel()
        else:
            self.late_answer(read=True)

    # -- the request ---------------------------------------------------------------------------

    def authorized(self, read: bool) -> bool:
        """The API key check; on a miss, answer 401 (closing the connection when the body is not ``read``)."""
        try:
            check_api_key(self.endpoints.service.settings, self.headers.get(b"authorization", b""))
        except HTTPException as exc:
            self.refuse(exc, read)
            return False
        return True

    def run(self, body: bytes, take: bool) -> None:
        """Serve ``body`` (taking its bytes from the budget first when ``take``): decode and queue it here,
        answer when its batch ran."""
        service = self.endpoints.service
        if take:
            try:
                self.share.take(len(body))
            except ServiceError as exc:  # the budget is full
                self.refuse(http_error(exc, service.settings.retry_after_s), read=True)
                return
        endpoints = self.endpoints
        repository = service.repository
        params = self.params
        name, version = params["name"], params.get("version")
        self.label = name if name in repository.models else UNKNOWN_MODEL
        self.started = time.perf_counter()
        try:
            check_names(repository, name, version)
            if self.path.endswith(":predict"):
                inference.predict_soon(repository, name, None, body, endpoints.limits, self.share.take_decoding,
                                       self._predicted)
            else:
                length = self.headers.get(_HEADER_LENGTH_KEY)
                inference.infer_soon(repository, name, version, body,
                                     None if length is None else length.decode("latin-1"), endpoints.limits,
                                     self.share.take_decoding, self._inferred, _http_answer)
        except Exception as exc:
            self.failed(exc)

    def _inferred(self, result: Answer | BaseException) -> None:
        if self.answered:  # its deadline answered it (504): this late result is neither sent nor counted
            return
        if isinstance(result, BaseException):
            self.failed(result)
            return
        self.endpoints.service.metrics.request(self.label, "success", time.perf_counter() - self.started)
        self.answer(result)

    def _predicted(self, result: list[dict[str, Any]] | BaseException) -> None:
        if self.answered:
            return
        if isinstance(result, BaseException):
            self.failed(result)
            return
        self.endpoints.service.metrics.request(self.label, "success", time.perf_counter() - self.started)
        self.answer((200, orjson.dumps({"predictions": result}), _JSON))

    def failed(self, exc: BaseException) -> None:
        """The answer to an error after the body was read: a service error's status, else (a bug) 500."""
        service = self.endpoints.service
        if isinstance(exc, ServiceError):
            if not self.answered:  # (else the deadline answered it: a late error is neither sent nor counted)
                service.metrics.request(self.label, OUTCOME.get(STATUS.get(type(exc), 500), "error"))
                self.refuse(http_error(exc, service.settings.retry_after_s), read=True)
            return
        # A bug: logged even when answered already; the same answer and log line as FastAPI's handler.
        event(logging.ERROR, "internal error", path=self.path, error=f"{type(exc).__name__}: {exc}")
        self.answer(_INTERNAL_ERROR)

    def refuse(self, exc: HTTPException, read: bool) -> None:
        """Answer ``exc``; the connection closes when the body was not ``read`` (so the rest is not read)."""
        self.endpoints.service.metrics.http_error(exc.status_code)
        self.answer((exc.status_code, orjson.dumps({"error": str(exc.detail)}),
                     [*_JSON, *((k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in (exc.headers or {}).items()),
                      *(() if read else (_CLOSE,))]))

    def late_answer(self, read: bool) -> None:
        """The answer past the deadline: 504 once the body was read, 408 while it still arrived."""
        status = 504 if read else 408
        self.endpoints.service.metrics.http_error(status)
        self.answer((status, orjson.dumps({"error": late_message(read, self.endpoints.deadlines.timeout_s)}),
                     [*_JSON, _CLOSE]))

    def answer(self, answer: Answer | None) -> None:
        """Give the budget back and hand ``answer`` (``None``: nobody to answer) to ``respond``, the first time."""
        if self.answered:
            return
        self.answered = True
        self.endpoints.deadlines.remove(self)
        share = self.share
        if share.held >= TRIM_BYTES:  # a large request: its memory goes back to the OS, not just to malloc
            trim_soon()
        share.release()
        self.respond(answer)


def _http_answer(model_name: str, model_version: str, request: codec.InferRequest, outputs: dict[str, Any],
                 specs: Any) -> Answer:
    """The 200 answer to an inference request (an :data:`service.inference.Encoder`): the body of
    :func:`codec.encode_infer_response`, and its content type and JSON header length."""
    body, header_length = codec.encode_infer_response(model_name, model_version, request, outputs, specs)
    if header_length is None:
        return 200, body, _JSON
    return 200, body, [_BINARY, (_HEADER_LENGTH_KEY, b"%d" % header_length)]


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


ROUTES_KEPT = 256  # paths whose direct route ServiceApp remembers (cleared when full)
ROUTE_BYTES_KEPT = 256  # longest path it remembers


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
        without ASGI (a body read whole already), or ``None``: then the request goes through :meth:`__call__`.

        Remembered for the last :data:`ROUTES_KEPT` paths of at most :data:`ROUTE_BYTES_KEPT` characters
        (clients repeat theirs): the parameters are shared by the requests to a path, and read only.
        """
        endpoints = self.endpoints
        if endpoints is None:
            return None
        routes = endpoints.direct_routes
        if path in routes:
            return routes[path]
        params = match_inference(path)
        route = None if params is None else (endpoints.serve, params)
        if len(path) <= ROUTE_BYTES_KEPT:
            if len(routes) >= ROUTES_KEPT:
                routes.clear()
            routes[path] = route
        return route

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
