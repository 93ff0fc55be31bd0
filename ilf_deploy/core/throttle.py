"""Log lines that come in floods (accept errors, timeouts, refused requests): the first at once,
then at most one per interval for each kind, saying how many events it stands for."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Protocol

LOG_INTERVAL_S = 10.0  # at most one line per kind of flood this often


class WarningLogger(Protocol):
    """What `Throttled` writes to: a `logging.Logger`, or an adapter (Triton's `pb_utils.Logger`)."""

    def warning(self, msg: str, *args: object, extra: dict | None = None) -> None: ...


class Throttled:
    """Warnings that come in floods: the first at once, then at most one per `interval_s` for
    each kind, its `count` field saying how many events the line stands for. Thread-safe (Triton
    calls a model from its own threads)."""

    def __init__(self, logger: WarningLogger | logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._pending: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def event(self, kind: str, message: str, count: int = 1) -> None:
        with self._lock:
            pending, _ = self._pending.get(kind, (0, message))
            self._pending[kind] = (pending + count, message)
        self.flush(kind)

    def flush(self, kind: str | None = None) -> None:
        now = time.monotonic()
        lines = []
        with self._lock:
            for name in [kind] if kind is not None else list(self._pending):
                count, message = self._pending.get(name, (0, ""))
                if count and now - self._last.get(name, -math.inf) >= self.interval_s:
                    lines.append((message, {"count": count, "interval_s": self.interval_s}))
                    self._last[name] = now
                    self._pending[name] = (0, message)
        for message, fields in lines:
            self.logger.warning("%s", message, extra={"fields": fields})
