"""django-clustershm: shared memory for the worker processes of one Django server.

The package's layout shows which side of the socket a module runs on:
``client/`` (the API given a transport), ``server/`` (the Manager), ``wire/``
(what travels between them), ``serve/`` (gunicorn), and at the top the thin
modules users import: this one, ``cache`` (the Django backend), ``lock``,
``listen``, ``signals``, ``exceptions``, ``conf`` (settings) and ``registry``
(which Manager this process talks to).

    import django_clustershm as clustershm

    clustershm.set("myObj", {"name": "Tom", "age": 10})
    clustershm.get("myObj")
    clustershm.incr("hits")
    clustershm.remove("myObj")
"""

from .api import (
    aadd,
    aclear,
    add,
    adecr,
    adelete_many,
    adelete_pattern,
    aexpire,
    aexpire_at,
    aget,
    aget_many,
    ahas,
    aincr,
    aiter_keys,
    akeys,
    apersist,
    aremove,
    aset,
    aset_many,
    astats,
    atouch,
    attl,
    capabilities,
    clear,
    decr,
    delete_many,
    delete_pattern,
    expire,
    expire_at,
    get,
    get_lru,
    get_many,
    has,
    incr,
    iter_keys,
    keys,
    near_stats,
    persist,
    ping,
    remove,
    remove_lru,
    set,
    set_lru,
    set_many,
    stats,
    touch,
    ttl,
)
from .cache import cached
from .client import Client, EmbeddedTransport, Keyspace, SocketTransport
from .client.aio import AsyncClient, AsyncKeyspace
from .exceptions import (
    ArgumentTypeError,
    AuthenticationFailed,
    BadSignature,
    ClusterShmError,
    IntegerOverflow,
    InvalidArgument,
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
    Unsupported,
    ValueTooLarge,
    WouldDeadlock,
)
from .listen import Handle, alisten, listen
from .lock import AsyncLock, Lock, amutex, get_lock, mutex, release_lock
from .registry import configure, connect, get_client
from .server import Engine, Limits, Manager
from .signals import changed

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by what users reach for, not alphabetically
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
    "capabilities",
    "touch",
    # expiry and key-space scans (django-redis's extra API)
    "delete_pattern",
    "expire",
    "expire_at",
    "iter_keys",
    "persist",
    "ttl",
    # the same, awaitable (asyncio: one pipelined connection per event loop)
    "aadd",
    "aclear",
    "adecr",
    "adelete_many",
    "aget",
    "aget_many",
    "ahas",
    "aincr",
    "akeys",
    "aremove",
    "aset",
    "aset_many",
    "astats",
    "atouch",
    "adelete_pattern",
    "aexpire",
    "aexpire_at",
    "aiter_keys",
    "apersist",
    "attl",
    # build once across the cluster (a ClusterShmCache's get_or_set, as a decorator)
    "cached",
    # the seed's LRU operations on the default cache
    "get_lru",
    "remove_lru",
    "set_lru",
    # listeners
    "Handle",
    "alisten",
    "listen",
    # locks
    "AsyncLock",
    "Lock",
    "amutex",
    "get_lock",
    "mutex",
    "release_lock",
    # listeners' Django signal
    "changed",
    # clients, transports and the Manager
    "AsyncClient",
    "AsyncKeyspace",
    "Client",
    "EmbeddedTransport",
    "Engine",
    "Keyspace",
    "Limits",
    "Manager",
    "SocketTransport",
    "configure",
    "connect",
    "get_client",
    # errors
    "ArgumentTypeError",
    "AuthenticationFailed",
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
    "BadSignature",
    "ValueTooLarge",
    "WouldDeadlock",
]
