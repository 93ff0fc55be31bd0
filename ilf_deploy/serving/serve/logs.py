"""Request ids and the server's log lines (human-readable by default, or one JSON object a line).

Everything goes through the standard `logging` machinery, as uvicorn's own lines do. A record's
structured fields travel in `extra={"fields": {...}}`; the formatters render them as `k=v` pairs
or as JSON members. Lines logged while a request is handled carry its id (a context variable).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("human", "json")
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_PRINTABLE = re.compile(r"[\x20-\x7e]+")  # printable ASCII: no control characters, so no log injection
_PLAIN = re.compile(r"[\w.:/@+\-]+")  # human-format values that need no quotes

current_request_id: ContextVar[str | None] = ContextVar("ilf_request_id", default=None)


def printable(text: str) -> str:
    """`text` as is when it is printable ASCII, else JSON-quoted (a newline cannot forge a log line)."""
    return text if _PRINTABLE.fullmatch(text) else json.dumps(text)


def request_id(header: bytes | None) -> str:
    """The client's `X-Request-ID` when it is printable ASCII of at most 128 characters, else a new id."""
    if header is not None and 0 < len(header) <= MAX_REQUEST_ID:
        text = header.decode("latin-1")
        if _PRINTABLE.fullmatch(text):
            return text
    return uuid.uuid4().hex


@dataclass
class RequestInfo:
    """What one HTTP request's access log line says; handlers add their fields (plan, n, ...)."""

    request_id: str
    key: str | None = None  # the API key's name
    fields: dict[str, Any] = field(default_factory=dict)


SCOPE_KEY = "ilf_deploy.request"  # where the ASGI scope holds the RequestInfo


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    rid = current_request_id.get()
    if rid is not None and "request_id" not in fields and "request_ids" not in fields:
        fields = {"request_id": rid, **fields}
    return fields


def _human(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_human(v) for v in value) or "-"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)  # quoted, control characters escaped


class HumanFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: message k=v ...` (fields named in the record's `in_message` are left out:
    the message already shows them)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = getattr(record, "in_message", ())
        pairs = [f"{k}={_human(v)}" for k, v in _fields(record).items() if v is not None and k not in shown]
        return " ".join([super().formatMessage(record), *pairs])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)  # ASCII only, newlines escaped: one line per record


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (as logging.lastResort does)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class FloodFilter(logging.Filter):
    """Lets each of `messages` (a logger's line per bad request, say) through at most once per
    `interval_s`; the next line it lets through has a `suppressed` field counting the others."""

    def __init__(self, messages: Iterable[str], interval_s: float = 10.0) -> None:
        super().__init__()
        self.messages, self.interval_s = frozenset(messages), interval_s
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.messages:
            return True
        now = time.monotonic()
        last, suppressed = self._seen.get(record.msg, (-math.inf, 0))
        if now - last < self.interval_s:
            self._seen[record.msg] = (last, suppressed + 1)
            return False
        self._seen[record.msg] = (now, 0)
        if suppressed:
            record.fields = {**(getattr(record, "fields", None) or {}), "suppressed": suppressed}
        return True


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else HumanFormatter()


def configure_logging(log_format: str, level: int) -> None:
    """Route this package's and uvicorn's loggers to stderr in `log_format` (`human` or `json`).

    uvicorn is then started with `log_config=None` (it keeps this setup) and `access_log=False`:
    the server's own access lines replace uvicorn's, which carry no request id or key name."""
    handler = _StderrHandler()
    handler.setFormatter(formatter(log_format))
    for name in ("ilf_deploy", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):  # through "uvicorn"'s handler
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
