"""`--max-inflight-per-key`: how many images one API key may have queued or running at once.

Plain bookkeeping, no I/O: the server holds a key's images from the moment they are admitted until
their request has its answer, and releases them however the request ends. Used from the event
loop only (no lock).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class OverLimit(Exception):
    """The key already holds `held` images; `n` more would pass `limit`."""

    def __init__(self, key: str, held: int, n: int, limit: int) -> None:
        super().__init__(f"{key} holds {held} images; {n} more would pass {limit}")
        self.key, self.held, self.n, self.limit = key, held, n, limit


class KeyLimiter:
    """At most `limit` images per key name; `limit` None, or a request without a key: no limit."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def held(self, key: str | None) -> int:
        return self._held.get(key, 0) if key is not None else 0

    def acquire(self, key: str | None, n: int) -> None:
        """Hold `n` images for `key`, or raise OverLimit (holding nothing)."""
        if key is None:
            return
        held = self.held(key)
        if self.limit is not None and held + n > self.limit:
            raise OverLimit(key, held, n, self.limit)
        self._held[key] = held + n

    def release(self, key: str | None, n: int) -> None:
        if key is None:
            return
        left = self.held(key) - n
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)

    @contextmanager
    def hold(self, key: str | None, n: int) -> Iterator[None]:
        """`n` images held for the block, released however it ends."""
        self.acquire(key, n)
        try:
            yield
        finally:
            self.release(key, n)
