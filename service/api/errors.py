"""Service errors -> HTTP errors, and the ``{"error": "..."}`` body every error response has."""

from __future__ import annotations

from fastapi import HTTPException

from service.errors import InvalidInput, ModelNotFound, ModelNotReady, Overloaded, ServiceError

STATUS: dict[type[ServiceError], int] = {InvalidInput: 400, ModelNotFound: 404, ModelNotReady: 503, Overloaded: 503}
OUTCOME: dict[int, str] = {400: "invalid_input", 404: "not_found", 503: "unavailable"}


def http_error(exc: ServiceError, retry_after_s: int = 1) -> HTTPException:
    """The HTTPException for a service error; overload adds ``Retry-After``."""
    status = STATUS.get(type(exc), 500)
    headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, Overloaded) else None
    return HTTPException(status, str(exc), headers=headers)
