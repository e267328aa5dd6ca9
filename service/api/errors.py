"""Service errors -> HTTP errors, and the ``{"error": "..."}`` body every error response has.

Messages name the client's mistake, never the server's insides: :func:`public` cuts the source
locations onnxruntime puts into its messages (``/onnxruntime_src/.../reshape_helper.h:84
onnxruntime::ReshapeHelper::ReshapeHelper(...)``) and shortens any other absolute file path to its
last part; the full message goes to the log.
"""

from __future__ import annotations

import logging
import re

from fastapi import HTTPException

from service.errors import (
    ControlDisabled,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServiceError,
    TooLarge,
)
from service.logs import event

STATUS: dict[type[ServiceError], int] = {InvalidInput: 400, TooLarge: 413, ModelNotFound: 404, ModelNotReady: 503,
                                         Overloaded: 503, ControlDisabled: 403, LoadFailed: 400}
OUTCOME: dict[int, str] = {400: "invalid_input", 404: "not_found", 408: "timeout", 413: "too_large",
                           503: "unavailable", 504: "timeout"}

# A C/C++ source location and the function name onnxruntime prints after it.
_SOURCE = re.compile(r"(?:/[\w.+-]+)+\.(?:h|hh|hpp|c|cc|cpp|cxx|cu)(?::\d+)?"
                     r"(?:\s+[\w:~<>,*& ]+\([^()]*\)(?:\s*const)?)?\s*")
# Any other absolute path of two or more parts (not a quoted ONNX node name such as '/conv1/Conv').
_PATH = re.compile(r"(?<![\w'\"/.-])/(?:[\w.+-]+/)+([\w.+-]+)")


def public(message: str) -> str:
    """``message`` without source locations, and with absolute paths cut to their last part."""
    if "/" not in message:
        return message
    return _PATH.sub(r"\1", _SOURCE.sub("", message))


def http_error(exc: ServiceError, retry_after_s: int = 1) -> HTTPException:
    """The HTTPException for a service error; overload adds ``Retry-After``; paths are cut (logged in full)."""
    status = STATUS.get(type(exc), 500)
    headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, Overloaded) else None
    message = str(exc)
    shown = public(message)
    if shown != message:
        event(logging.INFO, "error detail", status=status, error=message)
    return HTTPException(status, shown, headers=headers)
