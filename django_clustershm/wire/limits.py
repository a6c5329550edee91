"""The sizes both sides respect: told to every client at the handshake."""

from __future__ import annotations

from .frames import DEFAULT_MAX_FRAME, FRAME_OVERHEAD

DEFAULT_MAX_KEY = 4096
DEFAULT_MAX_VALUE = 32 * 1024 * 1024


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
