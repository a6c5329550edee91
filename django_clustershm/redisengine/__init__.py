"""The Redis engine: the same API on Redis or Valkey, switched by ``CLUSTERSHM["ENGINE"]`` (issue #15).

Needs redis-py (``pip install 'django-clustershm[redis]'``). See
:mod:`.config` for the URLs and options, :mod:`.scripts` for the data layout
and the fair lock, :mod:`.values` for signed values, :mod:`.watchdog` for
leases, and the README's table of what each engine guarantees.
"""

from __future__ import annotations

from .config import EngineConfig, is_local

__all__ = ["EngineConfig", "is_local", "make_transport"]


def make_transport(url: str, options: dict | None, *, timeout: float, limits, secret=None):
    """A :class:`.transport.RedisTransport` for ``url``; a clear error if redis-py is missing."""
    config = EngineConfig.parse(url, options)
    try:
        import redis  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        from ..exceptions import Unsupported

        raise Unsupported(
            f"CLUSTERSHM ENGINE {config.description!r} needs redis-py: pip install 'django-clustershm[redis]'"
        ) from exc
    from .transport import RedisTransport

    return RedisTransport(config, timeout=timeout, limits=limits, secret=secret)
