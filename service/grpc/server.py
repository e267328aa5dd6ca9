"""The gRPC server's options and lifecycle, on the running (uvicorn's) event loop.

Limits carried over from HTTP: a received message may have at most ``BNFOLD_MAX_BODY_BYTES``
(also once decompressed: gRPC checks the inflated size), a sent one at most
``BNFOLD_MAX_INFLIGHT_BYTES``, and at most ``BNFOLD_MAX_CONNECTIONS`` RPCs run at once (more get
``RESOURCE_EXHAUSTED``). With one worker the port is bound exclusively, so a port in use is a
start-up error; with ``BNFOLD_WORKERS`` > 1 every worker binds it with ``SO_REUSEPORT`` and the
kernel spreads connections over them (a gRPC connection is long-lived, so a client's requests go to
one worker; open several channels to use several).
"""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api.admission import Budget
from service.api.deps import Service
from service.grpc.servicer import Servicer
from service.logs import event

STOP_GRACE_S = 5.0  # in-flight RPCs get this long to finish when the server stops


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC parses it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def options(service: Service) -> list[tuple[str, int]]:
    settings = service.settings
    return [("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", settings.max_inflight_bytes),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0)]


class GrpcServer:
    """``inference.GRPCInferenceService`` on ``BNFOLD_HOST:BNFOLD_GRPC_PORT``; :meth:`start` and :meth:`stop` it."""

    def __init__(self, service: Service, budget: Budget) -> None:
        self.service = service
        self.servicer = Servicer(service, budget)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Raises ``RuntimeError`` naming the address when it cannot bind."""
        settings = self.service.settings
        assert settings.grpc_port is not None
        server = grpc.aio.server(options=options(self.service), maximum_concurrent_rpcs=settings.max_connections)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        where = address(settings.host, settings.grpc_port)
        try:
            port = server.add_insecure_port(where)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot serve gRPC on {where} (BNFOLD_GRPC_PORT): {exc}") from None
        if port == 0:  # older grpcio reports a failed bind this way
            raise RuntimeError(f"cannot serve gRPC on {where} (BNFOLD_GRPC_PORT): the address is in use or invalid")
        await server.start()
        self.servicer.deadlines.start()
        self.server, self.port = server, port
        event(logging.INFO, "grpc started", address=address(settings.host, port))
        return port

    async def stop(self) -> None:
        """Stop accepting RPCs; those in flight get :data:`STOP_GRACE_S` to finish."""
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)
            self.server = None
        await self.servicer.deadlines.stop()
