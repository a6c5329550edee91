"""The exceptions of django-clustershm.

Every error the library raises derives from :class:`ClusterShmError`, and
each also derives from the builtin that fits it, so code that already
catches ``ValueError`` or ``ConnectionError`` keeps working::

    ClusterShmError
     ├── ManagerUnavailable (ConnectionError)   the Manager is gone or does not answer
     │    └── AuthenticationFailed               refused at connect (secret or uid)
     ├── ProtocolError                           a malformed frame or reply
     ├── InvalidArgument (ValueError)            an argument out of its range (a NaN timeout)
     │    └── ArgumentTypeError (TypeError)       an argument of the wrong type (a str timeout)
     ├── InvalidKey (ValueError)                 not a str, or not encodable
     ├── ValueTooLarge (ValueError)              a key, value or batch over the maximum
     │    └── KeyTooLarge (InvalidKey)
     ├── SerializationError (pickle.PicklingError)  a value that cannot be serialized (pickled...)
     ├── KeyNotFound (LookupError)               incr/decr of a missing key
     ├── NotAnInteger (TypeError)                incr/decr of a value that is not an int
     ├── IntegerOverflow (OverflowError)         incr/decr past a signed 64-bit integer
     ├── StoreFull                               the store's byte budget is spent
     ├── LimitExceeded                           a per-connection limit (waiters, listeners)
     ├── LockNotOwned                            release/extend of a lock we do not hold
     ├── LockTimeout (TimeoutError)              a lock not acquired within its timeout
     ├── WouldDeadlock (RuntimeError)            a thread asking again for a lock it holds
     ├── BadSignature                            a value from a shared Redis whose HMAC does not match
     ├── Unsupported (NotImplementedError)       a feature the configured engine does not offer
     └── RemoteError                             an error from the Manager with no local class

Arguments are checked in the caller before anything is sent, so both modes
raise the same error for the same mistake; the Manager checks them again (a
rogue client) and answers an error it refuses with an error reply: only a
malformed frame costs a connection.

Errors travel from the Manager to the client as data (a code and a message,
see :mod:`django_clustershm.protocol`) and are raised again here as these
types: one place translates them (:func:`error_from_code`).
"""

from __future__ import annotations

import pickle

__all__ = [
    "ArgumentTypeError",
    "AuthenticationFailed",
    "BadSignature",
    "ClusterShmError",
    "IntegerOverflow",
    "InvalidArgument",
    "InvalidKey",
    "KeyNotFound",
    "KeyTooLarge",
    "LimitExceeded",
    "LockNotOwned",
    "LockTimeout",
    "ManagerUnavailable",
    "NotAnInteger",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "StoreFull",
    "Unsupported",
    "ValueTooLarge",
    "WouldDeadlock",
]


class ClusterShmError(Exception):
    """Root of every error raised by django-clustershm."""

    #: The code that carries this error on the wire (0: not sent on the wire).
    code = 0


class ManagerUnavailable(ClusterShmError, ConnectionError):
    """The Manager cannot be reached, went away, or did not answer in time."""

    code = 1


class AuthenticationFailed(ManagerUnavailable):
    """The Manager refused this client (wrong secret, other uid, bad version)."""

    code = 2


class ProtocolError(ClusterShmError):
    """A frame broke the wire protocol (bad magic, version, length or payload)."""

    code = 3


class InvalidKey(ClusterShmError, ValueError):
    """A key that is not a ``str`` or cannot be encoded as UTF-8."""

    code = 4


class ValueTooLarge(ClusterShmError, ValueError):
    """A key, value, batch or reply larger than the configured maximum."""

    code = 5


class KeyTooLarge(ValueTooLarge, InvalidKey):
    """A key longer than the configured maximum (in UTF-8 bytes)."""

    code = 6


class SerializationError(ClusterShmError, pickle.PicklingError):
    """A value its serializer cannot encode (pickle, JSON, msgpack). Raised in the caller; nothing is sent."""

    code = 7


class KeyNotFound(ClusterShmError, LookupError):
    """``incr``/``decr`` (without a default) of a key that does not exist."""

    code = 8


class NotAnInteger(ClusterShmError, TypeError):
    """``incr``/``decr`` of a value that is not stored as an integer."""

    code = 9


class IntegerOverflow(ClusterShmError, OverflowError):
    """``incr``/``decr`` whose result leaves the signed 64-bit range."""

    code = 10


class StoreFull(ClusterShmError):
    """The store's byte budget (``MAX_STORE_BYTES``) would be exceeded."""

    code = 11


class LimitExceeded(ClusterShmError):
    """A per-connection limit was reached (lock waiters, listeners...)."""

    code = 12


class LockNotOwned(ClusterShmError):
    """Release or extend of a lock that this caller does not hold (any more)."""

    code = 13


class LockTimeout(ClusterShmError, TimeoutError):
    """A lock could not be acquired within its timeout."""

    code = 14


class WouldDeadlock(ClusterShmError, RuntimeError):
    """A thread asked again for a non-reentrant lock it already holds."""

    code = 15


class InvalidArgument(ClusterShmError, ValueError):
    """An argument outside what the call accepts (a NaN or infinite timeout,
    a negative lease); the message names the argument."""

    code = 16


class ArgumentTypeError(InvalidArgument, TypeError):
    """An argument of the wrong type (a ``str`` or ``timedelta`` timeout, a
    ``bool`` count); the message names the argument."""

    code = 17


class BadSignature(ClusterShmError):
    """A value read from a shared engine (Redis) whose signature does not match:
    written by someone without the signing key, or for another key. Never
    unpickled."""

    code = 18


class Unsupported(ClusterShmError, NotImplementedError):
    """A feature the configured engine does not offer (yet): the message names it."""

    code = 19


class RemoteError(ClusterShmError):
    """An error reported by the Manager that has no more specific class here."""

    code = 99


_BY_CODE = {
    cls.code: cls
    for cls in (
        ManagerUnavailable,
        AuthenticationFailed,
        ProtocolError,
        InvalidKey,
        ValueTooLarge,
        KeyTooLarge,
        SerializationError,
        KeyNotFound,
        NotAnInteger,
        IntegerOverflow,
        StoreFull,
        LimitExceeded,
        LockNotOwned,
        LockTimeout,
        WouldDeadlock,
        InvalidArgument,
        ArgumentTypeError,
        BadSignature,
        Unsupported,
        RemoteError,
    )
}


def error_from_code(code: int, message: str) -> ClusterShmError:
    """Build the local exception for an error the Manager sent as data."""
    return _BY_CODE.get(code, RemoteError)(message)
