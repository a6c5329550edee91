"""One place that turns redis-py's errors into the library's tree (shared by the transports and the event channel)."""

from __future__ import annotations

from ..exceptions import (
    AuthenticationFailed,
    ClusterShmError,
    ManagerUnavailable,
    RemoteError,
    StoreFull,
    error_from_code,
)

_NOT_REACHABLE = "the Redis engine at {where} cannot be reached: {error}"


def translate(exc: Exception, where: str) -> ClusterShmError:
    """One place that turns redis-py's errors into the library's tree."""
    import redis.exceptions as E

    if isinstance(exc, ClusterShmError):
        return exc
    message = str(exc)
    if isinstance(exc, E.ResponseError):
        if message.startswith("CSHM "):
            code, _, text = message[5:].partition(" ")
            text = text.split(" script: ", 1)[0]
            return error_from_code(int(code), text)
        if message.startswith("OOM"):
            return StoreFull(f"the Redis engine at {where} is full (maxmemory): {message}")
        if isinstance(exc, (E.ReadOnlyError, E.BusyLoadingError, E.TryAgainError, E.ClusterDownError)):
            return ManagerUnavailable(_NOT_REACHABLE.format(where=where, error=message))
        if isinstance(exc, E.NoPermissionError) or message.startswith(("NOPERM", "WRONGPASS", "NOAUTH")):
            return AuthenticationFailed(f"the Redis engine at {where} refused: {message}")
        return RemoteError(f"the Redis engine at {where} answered an error: {message}")
    if isinstance(exc, (E.AuthenticationError, E.AuthorizationError)):
        return AuthenticationFailed(f"the Redis engine at {where} refused the credentials: {message}")
    if isinstance(exc, (E.ConnectionError, E.TimeoutError, E.ClusterError, OSError)):
        return ManagerUnavailable(_NOT_REACHABLE.format(where=where, error=message or type(exc).__name__))
    return RemoteError(f"the Redis engine at {where}: {type(exc).__name__}: {message}")
