"""The embedded transport: the Manager's engine in this process (runserver, shells, test suites).

It drives the very :class:`~..server.engine.Engine` the Manager serves, under
one mutex, so the embedded mode has the cluster's semantics and limits by
construction; and the client checks every argument before either transport
sees it, so both refuse the same mistakes with the same errors.

Each thread has a session of its own, as each has a connection of its own in
a cluster, so locks behave the same (a lock is its holder thread's, and is
released when that thread ends). A waiting thread waits on a condition
without holding the engine's mutex, and moves the engine's clock along
(lease and wait expiry) every few milliseconds.

State lives in this process only. A process forked from this one gets its
own copy, which is not shared: that is logged once in the child, since it
usually means a prefork server runs without ``runcluster``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from ..exceptions import ClusterShmError, ManagerUnavailable
from ..server.engine import DEFERRED, NO_REPLY, Engine
from ..wire import frames as F
from ..wire.limits import Limits
from .transport import DEFAULT_TIMEOUT, USE_DEFAULT, Channel, Message, Transport

logger = logging.getLogger("django_clustershm.client")

#: Messages an embedded channel may hold unread before it counts as cut off,
#: as a socket listener is cut off when it falls 16 MiB behind.
MAX_CHANNEL_BACKLOG = 100_000


class _ThreadSession:
    """One thread's session on the engine (the counterpart of one connection
    per thread): when the thread ends, this object is collected and its
    session closed, which releases the locks the thread held."""

    __slots__ = ("dead", "replies", "rid", "session")

    def __init__(self, engine: Engine, dead: list) -> None:
        self.session = engine.open_session(pid=os.getpid())
        self.rid = 0
        self.replies: dict[int, Any] = {}
        # Called under the transport's mutex, which is then notified. The
        # dict's own method, not one of ours: no reference cycle, so this
        # object is freed (and its session closed) as soon as its thread ends.
        self.session.deliver = self.replies.__setitem__
        self.dead = dead

    def __del__(self) -> None:
        # Not closed here: this may run anywhere, even inside the engine.
        self.dead.append(self.session)


class EmbeddedTransport(Transport):
    """An in-process engine, with the cluster's semantics."""

    name = "embedded"
    remote = False
    #: How often a waiting thread checks leases, deadlines and dead threads.
    wait_slice = 0.005

    def __init__(self, engine: Engine | None = None, *, timeout: float = DEFAULT_TIMEOUT, **engine_options) -> None:
        self.engine = engine or Engine(**engine_options)
        self.timeout = timeout
        self.mutex = threading.Condition(threading.Lock())
        self._local = threading.local()
        self._dead: list = []
        self._forked = False
        self.retired = False
        self._channels: weakref.WeakSet = weakref.WeakSet()

    def __repr__(self) -> str:
        return "<EmbeddedTransport>"

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    def _thread_session(self) -> _ThreadSession:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadSession(self.engine, self._dead)
        return state

    def housekeeping(self) -> None:
        """Under the mutex: close the sessions of threads that ended, move the clock."""
        if self.retired:
            raise ManagerUnavailable("this embedded Manager was handed over to the cluster's Manager")
        engine = self.engine
        dead = self._dead
        while dead:
            engine.close_session(dead.pop())
        engine.tick()

    def call(self, op: int, args: list, timeout: Any = USE_DEFAULT) -> Any:
        if self._forked:
            self._forked = False
            logger.warning(
                "django-clustershm: process %d uses an embedded Manager inherited through fork(); its state "
                "is a private copy, not shared with other processes. Serve with 'manage.py runcluster' "
                "(or the gunicorn config module) to share state between workers.",
                os.getpid(),
            )
        with self.mutex:
            self.housekeeping()  # raises if the engine was handed over
            # Made under the mutex: opening a session changes the engine.
            state = self._thread_session()
            state.rid += 1
            rid = state.rid
            result = self.engine.dispatch(state.session, op, args, rid)
            if result is not DEFERRED:
                if state.replies:
                    self.mutex.notify_all()
                return result
            # A lock wait: the engine answers when it grants the lock or the
            # wait runs out (its own deadline), like the Manager does.
            replies = state.replies
            while rid not in replies:
                self.mutex.wait(self.wait_slice)
                self.housekeeping()
                self.mutex.notify_all()
            return replies.pop(rid)

    def open_channel(self) -> EmbeddedChannel:
        channel = EmbeddedChannel(self)
        self._channels.add(channel)
        return channel

    def _lose_channels(self, reason: str) -> None:
        for channel in list(self._channels):
            channel.lose(ManagerUnavailable(reason))

    def retire(self) -> Engine:
        """Hand the engine over (to a Manager that will serve it): close every
        session of this transport, and refuse calls from now on."""
        with self.mutex:
            self.retired = True
            for session in list(self.engine.sessions.values()):
                self.engine.close_session(session)
            self._dead.clear()
            self.mutex.notify_all()
        self._lose_channels("this embedded Manager was handed over to the cluster's Manager")
        return self.engine

    def close(self) -> None:
        """Close this thread's session: whatever locks it held are released."""
        state = getattr(self._local, "state", None)
        if state is not None and not self.retired:
            self._local.state = None
            with self.mutex:
                self.engine.close_session(state.session)
                self.mutex.notify_all()

    def after_fork(self) -> None:
        # The parent's threads are gone from the child: so are their sessions
        # (and the locks they held in this private copy). The mutex may have
        # been held by one of them at the fork.
        self.mutex = threading.Condition(threading.Lock())
        self._local = threading.local()
        self._dead = []
        if not self.retired:
            for session in list(self.engine.sessions.values()):
                self.engine.close_session(session)
        for channel in list(self._channels):
            channel.after_fork()
        self._channels = weakref.WeakSet()
        self._forked = True


class EmbeddedChannel(Channel):
    """A push channel on an embedded engine: a session whose pushes and
    replies go into a queue, in the order the engine made them."""

    def __init__(self, transport: EmbeddedTransport) -> None:
        super().__init__()
        self.transport = transport
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Message] = deque()
        self._woken = False
        self._lost: ClusterShmError | None = None
        with transport.mutex:
            transport.housekeeping()
            session = self.session = transport.engine.open_session(pid=os.getpid())
        self.session_id = session.id
        # Called by the engine under the transport's mutex (lock order:
        # transport mutex, then this channel's condition; never the reverse).
        session.push = lambda event: self._put((F.PUSH_EVENT, 0, list(event)))
        session.deliver = lambda rid, result: self._put((F.OK, rid, result))

    def _put(self, message: Message) -> None:
        with self._cond:
            if self._lost is not None:
                return
            if len(self._queue) >= MAX_CHANNEL_BACKLOG:
                self._queue.clear()
                self._lost = ManagerUnavailable(f"cut off: {MAX_CHANNEL_BACKLOG} messages unread on this channel")
            else:
                self._queue.append(message)
            self._cond.notify()

    def lose(self, error: ClusterShmError) -> None:
        with self._cond:
            if self._lost is None:
                self._lost = error
            self._cond.notify()

    def after_fork(self) -> None:
        # The parent's channel, in the child: its session is closed, and no
        # thread of the child may be waiting on its old condition.
        self._cond = threading.Condition(threading.Lock())
        self._queue.clear()
        self._lost = ManagerUnavailable("the channel belongs to the parent process")

    def send(self, op: int, rid: int, args: list) -> None:
        transport = self.transport
        with transport.mutex:
            transport.housekeeping()
            try:
                result = transport.engine.dispatch(self.session, op, args, rid)
            except ClusterShmError as exc:
                self._put((F.ERR, rid, [exc.code, str(exc)]))
            else:
                if result is not NO_REPLY and result is not DEFERRED:
                    self._put((F.OK, rid, result))

    def post(self, op: int, args: list) -> None:
        try:
            self.send(op, 0, args)
        except ClusterShmError:
            pass  # a hint

    def ready(self) -> bool:
        return bool(self._backlog) or bool(self._queue) or self._lost is not None

    def _receive(self, timeout: float | None) -> list[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue and not self._woken and self._lost is None:
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._woken = False
            messages = list(self._queue)
            self._queue.clear()
            if not messages and self._lost is not None:
                raise self._lost
        return messages

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()

    def close(self) -> None:
        transport = self.transport
        with transport.mutex:
            if not transport.retired:
                transport.engine.close_session(self.session)
        self.lose(ManagerUnavailable("the channel was closed"))
