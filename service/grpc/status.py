"""Service errors -> gRPC status codes, through the HTTP status each has (one table: :data:`service.api.errors.STATUS`).

So a new service error gets its gRPC code from the HTTP status it is given, and the message is
the HTTP error's message, paths cut the same way (:func:`service.api.errors.public`).
"""

from __future__ import annotations

import logging

import grpc

from service.api.errors import STATUS, public
from service.errors import ServiceError
from service.logs import event

# HTTP status -> gRPC code (as KServe and Triton map them).
CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status (``INTERNAL`` for one without a mapping, as for a 500)."""
    return CODES.get(http_status, grpc.StatusCode.INTERNAL)


def status_of(exc: ServiceError) -> tuple[grpc.StatusCode, str]:
    """The code and the message a client sees for ``exc``; a message with paths cut is logged in full."""
    status = STATUS.get(type(exc), 500)
    message = str(exc)
    shown = public(message)
    if shown != message:
        event(logging.INFO, "error detail", status=status, error=message)
    return code_of(status), shown
