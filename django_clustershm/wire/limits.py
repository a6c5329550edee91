"""The sizes both sides respect: told to every client at the handshake."""

from __future__ import annotations

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
