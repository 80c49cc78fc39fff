"""Request logs: one line per request with its request id (the id that lands in the audit entry).

``FLAGSVC_LOG_FORMAT=json`` makes every log record a JSON line (for Loki, Elasticsearch...);
the default is plain text. Either way a record is one line, whatever a request path or a reason
holds (JSON escapes, text shows control and bidi characters as ``\\n``, ``\\x1b``, ``\\u202e``).
Secrets never appear: tokens are logged by name only.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import UTC, datetime
from typing import TextIO

from flask import Flask, Response, g, request

from flagsvc_client._escaping import printable

log = logging.getLogger("flagsvc.requests")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message and any ``extra`` fields."""

    STANDARD = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            {k: v for k, v in vars(record).items() if k not in self.STANDARD and not k.startswith("_")}
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain text with the message and every field escaped by :func:`printable`: no request can
    write a second line, move the cursor or reorder what a terminal shows. A traceback keeps its
    own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = copy.copy(record)
        for name, value in vars(record).items():
            if isinstance(value, str):
                setattr(shown, name, printable(value))
        return super().formatMessage(shown)


class _FlagsvcHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installs, so that it is installed once."""


def configure(fmt: str, level: str = "INFO") -> None:
    """Log to stderr in ``fmt`` ("json" or "text"), once, next to any handler already there."""
    root = logging.getLogger()
    if any(isinstance(h, _FlagsvcHandler) for h in root.handlers):
        return
    handler = _FlagsvcHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())


def init_app(app: Flask) -> None:
    fmt = str(app.config.get("LOG_FORMAT") or "")
    if fmt:
        configure(fmt, str(app.config.get("LOG_LEVEL") or "INFO"))

    @app.before_request
    def _start() -> None:
        g.log_start = time.perf_counter()

    @app.after_request
    def _log(response: Response) -> Response:
        if fmt and request.path not in ("/metrics", "/healthz"):
            token = g.get("token")
            log_request(
                request.method,
                request.path,
                response.status_code,
                request_id=getattr(request, "request_id", None),
                seconds=time.perf_counter() - g.get("log_start", time.perf_counter()),
                actor=token.name if token is not None else None,
                remote=request.remote_addr,
            )
        return response


def log_request(
    method: str,
    path: str,
    status: int,
    *,
    request_id: str | None,
    seconds: float,
    actor: str | None,
    remote: str | None,
) -> None:
    """The one log line of a request (also written by :mod:`flagsvc.fastpath` for polls)."""
    log.info(
        "%s %s %s",
        method,
        path,
        status,
        extra={
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "actor": actor,
            "remote": remote,
        },
    )
