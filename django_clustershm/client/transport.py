"""The one seam between what the API does and how a request travels.

A :class:`~.client.Client` holds the API (keys, limits, serialisation, the
error tree, locks, listeners, near caches) and is *given* a transport, as an
``httpx.Client`` is given a ``BaseTransport``. A transport does two things:

* :meth:`Transport.call`: one request, its result (or its error raised),
  within a timeout;
* :meth:`Transport.open_channel`: a :class:`Channel` of its own on which the
  Manager *pushes* (listener events, near-cache updates and invalidations),
  and on which a few requests travel too (subscribe, unsubscribe, a barrier).

The listener dispatcher (:mod:`.dispatcher`) and the near cache
(:mod:`.near`) use nothing else. Two transports implement it today:
:class:`~.socket.SocketTransport` (a Manager over its Unix socket) and
:class:`~.embedded.EmbeddedTransport` (an in-process engine). The asyncio
client will add an awaitable twin of this interface, and a Redis engine
another implementation: nothing above this seam knows which one it has.

Timeouts: ``call(..., timeout=USE_DEFAULT)`` waits the transport's own
``timeout`` for the reply; a number of seconds overrides it; ``None`` waits
without limit (a lock acquire that waits forever: the Manager answers when
it grants the lock).

A process that must show a supervisor it is alive while it waits (a
gunicorn worker: its arbiter kills a worker that does not ``notify()`` for
``--timeout`` seconds) registers a heartbeat (:func:`set_heartbeat`): a lock
wait calls it as it starts to block, and then every ``interval`` seconds
while it blocks. Only lock waits, whose length is the lock's timeout: any
other call gives up within the transport's ``timeout``, and a call that
hangs longer should be seen as hung.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ..exceptions import ManagerUnavailable, error_from_code
from ..wire import frames as F
from ..wire.limits import Limits

DEFAULT_TIMEOUT = 5.0

logger = logging.getLogger("django_clustershm")


class _UseDefault:
    """The "use the transport's default" sentinel (httpx's ``USE_CLIENT_DEFAULT``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _UseDefault()

#: What the local engine (a Manager, or the embedded one) guarantees; the Redis
#: engine declares its own (see ..redisengine.ops.Capabilities and the README).
LOCAL_CAPABILITIES: dict = {
    "engine": "local",
    "shared_across_hosts": False,
    "lock_freed_when_holder_dies": "at once (its connection closes)",
    "lock_fifo": True,
    "lock_fencing": "strictly increasing per key, for the Manager's lifetime",
    "lock_wait_deadline": "decided by the Manager's clock",
    "listeners": "heard before the writer's call returns",
    "near_cache": "strict: never older than a completed write",
    "multi_key_atomic": "set_many, delete_many, clear: one step",
    "cache_cull": "LRU, by entries and by bytes",
    "durability": "lives as long as the master (SNAPSHOT: across restarts)",
}

#: (pid, callback, interval): see set_heartbeat.
_heartbeat: tuple[int, Callable[[], None], float] | None = None


def set_heartbeat(callback: Callable[[], None] | None, interval: float = 0.0) -> None:
    """Call ``callback()`` when a lock wait of this process starts to block,
    and at least every ``interval`` seconds while it blocks (``None``: no
    heartbeat). runcluster's ``post_fork`` hook sets gunicorn's
    ``worker.notify`` here, so that a worker waiting for a lock is not killed
    as hung: the lock's own timeout decides. Process-local: a child forked
    afterwards has none until it sets its own."""
    global _heartbeat
    if callback is None:
        _heartbeat = None
        return
    if not interval > 0:
        raise ValueError(f"the heartbeat interval must be positive, not {interval!r}")
    _heartbeat = (os.getpid(), callback, float(interval))


def heartbeat() -> tuple[Callable[[], None], float] | None:
    """This process's ``(callback, interval)``, if it set one."""
    registered = _heartbeat
    if registered is None or registered[0] != os.getpid():
        return None
    return registered[1], registered[2]


def beat(callback: Callable[[], None]) -> None:
    """Call a heartbeat; one that fails does not fail the lock wait it serves."""
    try:
        callback()
    except Exception:  # a supervisor's bookkeeping, not the caller's business
        logger.debug("the heartbeat failed", exc_info=True)


#: A message on a channel: (opcode, request id, decoded payload).
Message = tuple


class Transport(ABC):
    """How requests reach a Manager."""

    #: "socket", "embedded"...: for logs and stats.
    name: str = ""
    #: Whether the state lives in another process (then near caches pay off).
    remote: bool = False
    #: Whether a cache or the store gets a near cache when NEAR_CACHE is left
    #: out (the local engine over a socket: strict, and cheap to keep).
    near_by_default: bool = False
    #: Whether SET, ADD, REPLACE and SET_MANY may carry a :class:`~..wire.frames.Spliced`
    #: value (a big value's pickle sent as several buffers, not copied): the
    #: socket transports; the others get the pickle's bytes.
    splices: bool = False
    #: Seconds a call waits for its reply by default.
    timeout: float = DEFAULT_TIMEOUT
    #: What this engine guarantees (the Redis engine declares its own).
    capabilities: dict = LOCAL_CAPABILITIES
    #: Features this engine refuses: {"listen" or "near_cache": the one-sentence reason}.
    refuses: dict = {}
    #: Whether a release that hands a lock over should yield the CPU to the woken
    #: waiter (the socket transport: the waiter sleeps in recv() on this host).
    yields_on_handoff = False

    @property
    def stamps_file(self) -> str | None:
        """The Manager's near-cache stamps file (see server/stamps.py), if it has one."""
        return None

    @property
    @abstractmethod
    def limits(self) -> Limits:
        """The sizes requests must respect (a socket transport learns them at its handshake)."""

    @abstractmethod
    def call(self, op: int, args: list, timeout: Any = USE_DEFAULT) -> Any:
        """Send one request; return its result, or raise the error the Manager answered."""

    @abstractmethod
    def open_channel(self) -> Channel:
        """A new push channel (one per listener dispatcher, one per near-cache tracker)."""

    @abstractmethod
    def after_fork(self) -> None:
        """In a forked child: drop (never use) what belongs to the parent, renew
        every lock another thread may have held at the fork. Never blocks."""

    def make_tracker(self) -> Any:
        """The near caches' tracker of this process, if this engine keeps them
        its own way (the Redis engine: RESP3 tracking); None: the Manager's
        protocol (:class:`.near.Tracker` over :meth:`open_channel`)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: not every transport holds anything per thread
        """Release what the calling thread holds (its connection or session);
        the transport stays usable."""

    def shutdown(self) -> None:  # noqa: B027 - optional: only a transport with process-wide resources
        """Release what the whole process holds through this transport (pools,
        threads): the client is being dropped."""


class Channel(ABC):
    """A connection of its own, on which the Manager pushes messages.

    :meth:`receive` returns what arrived as messages ``(opcode, rid, body)``:
    pushes (``PUSH_EVENT``, ``PUSH_UPDATE``, ``PUSH_INVALIDATE``) and the
    replies (``OK``/``ERR``) to requests sent with :meth:`send`, all in the
    order the Manager sent them. A reply to a request therefore comes after
    every push the Manager queued for this channel before it: that is what
    makes a barrier (:meth:`request` of a PING) possible.
    """

    def __init__(self) -> None:
        self._backlog: list[Message] = []
        self._rid = 0

    @abstractmethod
    def send(self, op: int, rid: int, args: list) -> None:
        """Send a request; its reply arrives through :meth:`receive`."""

    @abstractmethod
    def post(self, op: int, args: list) -> None:
        """Send a hint that has no reply, without ever blocking (it may be
        dropped when the Manager does not read this channel)."""

    @abstractmethod
    def _receive(self, timeout: float | None) -> list[Message]:
        """What arrived, waiting up to ``timeout`` (0: do not wait, None: no limit)."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether :meth:`receive` has something now (never blocks; cheap: polled on reads)."""

    @abstractmethod
    def wake(self) -> None:
        """Make a :meth:`receive` blocked in another thread return (thread-safe)."""

    @abstractmethod
    def close(self) -> None:
        """Close the channel (the Manager forgets its subscriptions and tracking)."""

    def receive(self, timeout: float | None) -> list[Message]:
        """Messages that arrived (an empty list when woken or timed out);
        ManagerUnavailable when the channel is lost."""
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            return backlog
        return self._receive(timeout)

    def next_rid(self) -> int:
        self._rid = (self._rid + 1) & 0xFFFFFFFF or 1
        return self._rid

    def request(self, op: int, args: list, timeout: float) -> Any:
        """Send a request and wait for its reply; pushes that arrive meanwhile
        are kept, in order, for the next :meth:`receive`."""
        rid = self.next_rid()
        self.send(op, rid, args)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ManagerUnavailable(f"no reply from the Manager within {timeout}s")
            messages = self._receive(left)
            for i, message in enumerate(messages):
                mop, mrid, body = message
                if mrid == rid and mop in (F.OK, F.ERR):
                    self._backlog.extend(messages[i + 1 :])
                    if mop == F.ERR:
                        raise error_from_code(body[0], body[1])
                    return body
                self._backlog.append(message)
