"""Wire the app: settings, logging, model repository lifespan, error bodies, routers, inference fast path.

``create_app(settings)`` builds an app; the module-level ``app`` (settings from the environment)
is what ``uvicorn service.main:app`` and worker processes import; :func:`run` starts uvicorn with
the HTTP limits of :mod:`service.protocol` and uvicorn's own connection limit and keep-alive timeout.
With an API key set, ``/openapi.json`` needs the key too and the browsable ``/docs`` and ``/redoc``
are off (a browser cannot send the key to them).
"""

from __future__ import annotations

import gc
import logging
import logging.config
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bnfold._version import __version__
from service.api import fastpath
from service.api.deps import Service, require_api_key
from service.api.routes import health, metrics, models, repository, server
from service.config import Settings
from service.control import ModelControl
from service.cpu import usable_cpus
from service.logs import event, log_config
from service.metrics import ServiceMetrics, shared_directory
from service.protocol import HttpLimits, protocol_factory
from service.repository import ModelRepository

KEEP_ALIVE_S = 5  # uvicorn's default: an idle keep-alive connection is closed after this


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    repository: ModelRepository = app.state.service.repository
    metrics: ServiceMetrics = app.state.service.metrics
    metrics.open()
    app.endpoints.deadlines.start()  # type: ignore[attr-defined]
    repository.load()
    control: ModelControl = app.state.service.control
    control.start()
    if app.state.freeze_gc:
        freeze_startup_objects()
    versions = [v for versions in repository.models.values() for v in versions.values()]
    event(logging.INFO if repository.ready else logging.ERROR, "service started",
          repository=str(repository.settings.model_repository), usable_cpus=usable_cpus(),
          workers=repository.settings.workers, versions=len(versions), ready=sum(v.ready for v in versions),
          api_key=repository.settings.api_key is not None, model_control=control.mode)
    grpc_server = None
    try:
        grpc_server = await _start_grpc(app)  # inside the try: a port in use still closes the repository
        yield
    finally:
        await control.stop()
        if grpc_server is not None:
            await grpc_server.stop()  # in-flight RPCs finish before the batchers close
        await app.endpoints.deadlines.stop()  # type: ignore[attr-defined]
        repository.close()
        metrics.close()


def freeze_startup_objects() -> None:
    """Collect what start-up left behind, then exempt every object alive now from the cyclic GC's scans.

    Start-up leaves hundreds of thousands of long-lived objects (modules, the app, the loaded models'
    wrappers) that every full collection walks again, and requests allocate enough containers (the
    JSON of a request: its dicts and lists) to trigger those collections. That walk cost 25-45 us
    of CPU per JSON request to the small CNN under load (in-process, interleaved A/B runs), up to a
    quarter of the request. Frozen objects are still freed by reference counting; only
    a reference cycle among them would never be collected. Only a serving process does it (the apps of
    :func:`run` and the module-level :data:`app`): a process building many apps, a test run, would keep
    the cycles of every app it discarded.
    """
    gc.collect()
    gc.freeze()


async def _start_grpc(app: FastAPI) -> Any:
    """The gRPC server (:mod:`service.grpc`) on ``BNFOLD_GRPC_PORT``, started; ``None`` when that is unset."""
    service: Service = app.state.service
    if service.settings.grpc_port is None:
        return None
    try:
        from service.grpc.server import GrpcServer  # the grpc extra: imported only when asked for
    except (ImportError, RuntimeError) as exc:  # tritonclient.grpc raises RuntimeError without grpcio
        raise RuntimeError(f"BNFOLD_GRPC_PORT is set, but gRPC support is not installed ({exc}): "
                           "pip install 'bnfold[grpc]'") from None
    server = GrpcServer(service, app.endpoints.budget)  # type: ignore[attr-defined]  # one budget for both
    await server.start()
    return server


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    request.app.state.service.metrics.http_error(exc.status_code)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    request.app.state.service.metrics.http_error(400)
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    event(logging.ERROR, "internal error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    return JSONResponse({"error": "internal server error"}, status_code=500)


def create_app(settings: Settings | None = None, *, freeze_gc: bool = False) -> FastAPI:
    """A FastAPI app serving ``settings.model_repository`` (models load when the app starts).

    ``freeze_gc``: after start-up, exempt the objects alive then from the cyclic GC
    (:func:`freeze_startup_objects`), for a process that serves this one app.
    """
    settings = settings or Settings()
    logging.config.dictConfig(log_config(settings.log_level))
    keyed = settings.api_key is not None  # then the schema needs the key and the browsable docs are off
    app = fastpath.ServiceApp(title="bnfold inference service", version=__version__, lifespan=lifespan,
                              openapi_url=None if keyed else "/openapi.json", docs_url=None if keyed else "/docs",
                              redoc_url=None if keyed else "/redoc")
    registry = ServiceMetrics()
    model_repository = ModelRepository(settings, registry)
    app.state.service = Service(settings, model_repository, registry, ModelControl(model_repository))
    app.state.freeze_gc = freeze_gc
    # Inference bypasses FastAPI's request machinery (see service.api.fastpath for the measurements);
    # its raw routes lead the router so that other methods on those paths get 405, not 404.
    app.endpoints = fastpath.InferenceEndpoints(app.state.service)
    app.router.routes[:0] = fastpath.routes(app.endpoints)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    protected = [Depends(require_api_key)]
    for module in (models, server, metrics, repository):
        app.include_router(module.router, dependencies=protected)
    app.include_router(health.router)
    if keyed:
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        app.add_api_route("/openapi.json", openapi, include_in_schema=False, dependencies=protected)
    return app


def run(settings: Settings | None = None) -> None:
    """Start uvicorn with ``settings`` (worker processes read them back from ``BNFOLD_*``).

    Several workers share one prometheus_client multiprocess directory, so ``/metrics`` covers all of them.
    """
    settings = settings or Settings()
    limits = HttpLimits(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)
    common = {"host": settings.host, "port": settings.port, "log_config": log_config(settings.log_level),
              "access_log": settings.access_log, "timeout_graceful_shutdown": 10,
              "http": protocol_factory(limits), "limit_concurrency": settings.max_connections,
              "timeout_keep_alive": KEEP_ALIVE_S}
    if settings.workers == 1:
        uvicorn.run(create_app(settings, freeze_gc=True), **common)  # type: ignore[arg-type]
        return
    for key, value in settings.model_dump(exclude_none=True).items():
        os.environ[f"BNFOLD_{key.upper()}"] = str(value.get_secret_value() if key == "api_key" else value)
    with shared_directory():  # uvicorn spawns workers: fresh interpreters that inherit the variable
        uvicorn.run("service.main:app", workers=settings.workers, **common)  # type: ignore[arg-type]


app = create_app(freeze_gc=True)  # what worker processes serve; importing it starts nothing
