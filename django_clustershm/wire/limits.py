"""The sizes both sides respect: told to every client at the handshake."""

from __future__ import annotations

import os

from .frames import DEFAULT_MAX_FRAME, FRAME_OVERHEAD

DEFAULT_MAX_KEY = 4096
DEFAULT_MAX_VALUE = 32 * 1024 * 1024

# A named cache's bounds when a write gives none (the wire's nil): Django's
# MAX_ENTRIES and CULL_FREQUENCY defaults, and our MAX_BYTES. One table, for
# the client's keyspaces and the Manager's caches alike.
DEFAULT_MAX_ENTRIES = 300
DEFAULT_CULL_FREQUENCY = 3
DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
DEFAULT_BOUNDS = (DEFAULT_MAX_ENTRIES, DEFAULT_CULL_FREQUENCY, DEFAULT_CACHE_BYTES)
#: The Manager-wide ceiling of one cache's MAX_BYTES (setting MAX_CACHE_BYTES).
DEFAULT_MAX_CACHE_BYTES = 2**30


def memory_limit() -> int:
    """The memory this process may use: physical RAM, or its cgroup's limit if lower."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
        break
    return limit


def default_store_bytes() -> int:
    """The store's budget when MAX_STORE_BYTES is not set: a quarter of :func:`memory_limit`.

    Finite, so that a runaway writer meets ``StoreFull`` instead of the
    kernel's OOM killer taking the Manager (and every worker's state) down;
    large, so that no ordinary application meets it.
    """
    return memory_limit() // 4


def default_total_cache_bytes() -> int:
    """What all caches' MAX_BYTES may add up to (MAX_TOTAL_CACHE_BYTES): a quarter of memory too."""
    return memory_limit() // 4


class Limits:
    """``max_key`` (UTF-8 bytes of a key), ``max_value`` (bytes of a stored
    value) and ``max_frame`` (bytes of one request or reply payload).

    The client checks every request against them before sending (embedded
    too, so both modes refuse the same calls); the Manager checks again."""

    __slots__ = ("max_frame", "max_key", "max_value")

    def __init__(
        self, max_key: int = DEFAULT_MAX_KEY, max_value: int = DEFAULT_MAX_VALUE, max_frame: int | None = None
    ) -> None:
        if max_frame is None:
            max_frame = max(DEFAULT_MAX_FRAME, max_value + FRAME_OVERHEAD)
        if max_value + FRAME_OVERHEAD > max_frame:
            raise ValueError("max_frame must exceed max_value by at least FRAME_OVERHEAD")
        self.max_key = max_key
        self.max_value = max_value
        self.max_frame = max_frame

    def __repr__(self) -> str:
        return f"Limits(max_key={self.max_key}, max_value={self.max_value}, max_frame={self.max_frame})"

    def as_dict(self) -> dict:
        return {"max_key": self.max_key, "max_value": self.max_value, "max_frame": self.max_frame}
