"""Structured logs: one JSON object per line, for the service and for uvicorn's own loggers.

Never pass request headers to a log call: the API key must not reach the logs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

logger = logging.getLogger("bnfold.service")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...fields}``; fields come from ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` mapping routing bnfold and uvicorn loggers through :class:`JsonFormatter`."""
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {
            name: {"handlers": ["json"], "level": level, "propagate": False}
            for name in ("bnfold", "uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def event(level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` on the service logger."""
    logger.log(level, message, extra={"fields": fields})
