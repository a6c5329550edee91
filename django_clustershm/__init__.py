"""django-clustershm: shared memory for the worker processes of one Django server.

    import django_clustershm as clustershm

    clustershm.set("myObj", {"name": "Tom", "age": 10})
    clustershm.get("myObj")
    clustershm.incr("hits")
    clustershm.remove("myObj")
"""

from .api import (
    add,
    clear,
    decr,
    delete_many,
    get,
    get_lru,
    get_many,
    has,
    incr,
    keys,
    near_stats,
    ping,
    remove,
    remove_lru,
    set,
    set_lru,
    set_many,
    stats,
    touch,
)
from .client import Client, EmbeddedClient, SocketClient
from .conf import configure, connect, get_client
from .engine import Engine, Limits
from .exceptions import (
    AuthenticationFailed,
    ClusterShmError,
    IntegerOverflow,
    InvalidKey,
    KeyNotFound,
    KeyTooLarge,
    LimitExceeded,
    LockNotOwned,
    LockTimeout,
    ManagerUnavailable,
    NotAnInteger,
    ProtocolError,
    RemoteError,
    SerializationError,
    StoreFull,
    ValueTooLarge,
    WouldDeadlock,
)
from .listen import Handle, listen
from .lock import Lock, amutex, get_lock, mutex, release_lock
from .manager import Manager

__version__ = "0.1.0"

__all__ = [
    # the shared store (the seed's set/get/remove and more)
    "add",
    "clear",
    "decr",
    "delete_many",
    "get",
    "get_many",
    "has",
    "incr",
    "keys",
    "near_stats",
    "ping",
    "remove",
    "set",
    "set_many",
    "stats",
    "touch",
    # the seed's LRU operations on the default cache
    "get_lru",
    "remove_lru",
    "set_lru",
    # listeners
    "Handle",
    "listen",
    # locks
    "Lock",
    "amutex",
    "get_lock",
    "mutex",
    "release_lock",
    # clients and the Manager
    "Client",
    "EmbeddedClient",
    "Engine",
    "Limits",
    "Manager",
    "SocketClient",
    "configure",
    "connect",
    "get_client",
    # errors
    "AuthenticationFailed",
    "ClusterShmError",
    "IntegerOverflow",
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
    "ValueTooLarge",
    "WouldDeadlock",
]
