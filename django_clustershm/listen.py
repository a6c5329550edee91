"""Listeners: ``clustershm.listen()``, changes pushed from the Manager to every worker.

::

    import django_clustershm as clustershm

    def on_change(key, value, event):      # event: "set", "remove", "expire", "evict" or "clear"
        ...

    handle = clustershm.listen("feature:checkout", on_change)
    handle = clustershm.listen(prefix="flags:", callback=on_change)
    handle = clustershm.listen(prefix="", callback=on_change, cache="default")  # a cache's keys
    handle.cancel()

Each process has one listener connection and one *dispatcher* thread that
runs the callbacks, in the order of the writes to each key. An exception in
a callback is logged and delivery goes on. For every event, the Django
signal :data:`django_clustershm.signals.changed` is sent too (``sender`` is
the namespace: ``""`` for the shared store, the cache's LOCATION otherwise).

The Manager writes an event to the listener's socket before it replies to
the writer, so a listener hears of a write before the writer's call returns
(its callback runs as soon as its dispatcher reads it). A process that does
not read its events fast enough (16 MiB behind) is cut off: its connection is
closed, the events pending for it are dropped, and its dispatcher logs that,
reconnects and subscribes again. The listeners of a dead worker die with its
connection.

Listeners survive fork: a listener registered before a fork (in an
``AppConfig.ready()``, which ``runcluster`` runs in the master) is subscribed
again, once, in each child, whose dispatcher starts at the fork; and they
follow the process when it moves from the embedded Manager to a cluster's.

For a cache, keys are Django's full keys (``KEY_PREFIX:VERSION:key``, what
``cache.make_key(key)`` returns) and ``key`` and ``prefix`` are taken as
such; ``cache.make_key`` helps build them.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import socket
import threading
import time
from typing import Any, Callable

from . import conf
from . import protocol as P
from .client import EmbeddedClient, SocketClient, _Connection, decode_value
from .exceptions import ClusterShmError, ManagerUnavailable, error_from_code

logger = logging.getLogger("django_clustershm.listen")

__all__ = ["Handle", "listen"]

_ids = itertools.count(1)


class Handle:
    """One subscription; :meth:`cancel` stops its delivery."""

    def __init__(
        self, ns: str, key: str, prefix: bool, callback: Callable | None, on_resync: Callable | None = None
    ) -> None:
        self.id = next(_ids)
        self.ns = ns
        self.key = key
        self.prefix = prefix
        self.callback = callback
        self.on_resync = on_resync
        self.active = True
        self.delivered = 0
        self.subscriptions = 0  # how many times the Manager confirmed it (1 + resubscriptions)
        self.subscribed = threading.Event()
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        what = f"prefix={self.key!r}" if self.prefix else f"key={self.key!r}"
        return f"<Handle {what} ns={self.ns!r} active={self.active}>"

    def cancel(self) -> None:
        """Stop delivery to this handle (no callback runs for it afterwards)."""
        if self.active:
            self.active = False
            _hub.cancel(self)


class _Hub:
    """The process's listener connection and dispatcher thread."""

    #: Events an embedded dispatcher may have queued before it counts as cut off.
    embedded_backlog = 100_000

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._todo: list[tuple[str, Handle]] = []
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._queue: queue.Queue | None = None  # embedded
        self._embedded_session = None
        self._client = None

    # -- API -------------------------------------------------------------------------

    def listen(self, handle: Handle, timeout: float) -> Handle:
        with self._lock:
            self._handles[handle.id] = handle
            self._ensure_running()
            self._todo.append(("listen", handle))
            self._wake()
        if not handle.subscribed.wait(timeout):
            handle.cancel()
            raise ManagerUnavailable(f"the listener was not subscribed within {timeout}s")
        if handle.error is not None:
            handle.active = False
            with self._lock:
                self._handles.pop(handle.id, None)
            raise handle.error
        return handle

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            if self._handles.pop(handle.id, None) is not None:
                self._todo.append(("unlisten", handle))
                self._wake()

    # -- the dispatcher ----------------------------------------------------------------

    def _ensure_running(self) -> None:
        client = conf.get_client()
        if self._thread is not None and self._thread.is_alive() and client is self._client:
            return
        self._restart(client)

    def _restart(self, client) -> None:
        """(Re)start the dispatcher on ``client``, subscribing every active handle."""
        with self._lock:
            self._generation += 1
            self._client = client
            self._todo = [("listen", h) for h in self._handles.values()]
            for handle in self._handles.values():
                handle.subscribed.clear()
            old_wake = (self._wake_r, self._wake_w)
            self._wake_r, self._wake_w = socket.socketpair()
            for sock in old_wake:
                if sock is not None:
                    sock.close()  # an old dispatcher sees its generation is over
            target = self._run_socket if isinstance(client, SocketClient) else self._run_embedded
            self._thread = threading.Thread(
                target=target, args=(self._generation, client), name="clustershm-listeners", daemon=True
            )
            self._thread.start()

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:
            pass
        q = self._queue
        if q is not None:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass

    def _take_todo(self) -> list:
        with self._lock:
            todo, self._todo = self._todo, []
        return todo

    def _confirmed(self, handle: Handle) -> None:
        """The Manager has the subscription (again). After the first time (a
        fork, a reconnection, a cut-off), events may have been missed in
        between: ``on_resync()`` lets the owner reload what it mirrors."""
        handle.subscriptions += 1
        handle.subscribed.set()
        if handle.subscriptions > 1 and handle.on_resync is not None and handle.error is None:
            try:
                handle.on_resync()
            except Exception:
                logger.exception("on_resync of %r raised", handle)

    def _dispatch(self, sub_id: int, ns: str, key, event: int, value) -> None:
        handle = self._handles.get(sub_id)
        if handle is None or not handle.active:
            return
        name = P.EVENT_NAMES.get(event, str(event))
        try:
            obj = None if value is None else decode_value(value)
        except Exception:
            logger.exception("cannot unpickle the value of %r for a listener", key)
            obj = None
        handle.delivered += 1
        if handle.callback is not None:
            try:
                handle.callback(key, obj, name)
            except Exception:
                logger.exception("listener callback %r raised on %s of %r; delivery goes on", handle.callback, name, key)
        try:
            from .signals import changed

            changed.send(sender=ns, key=key, value=obj, event=name, handle=handle)
        except Exception:
            logger.exception("a receiver of django_clustershm.signals.changed raised")

    def _run_socket(self, generation: int, client: SocketClient) -> None:
        backoff = 0.05
        wake_r = self._wake_r
        while self._generation == generation:
            try:
                conn = _Connection(client.address, client.secret, client.timeout)
            except ClusterShmError as exc:
                logger.warning("listener connection failed (%s); retrying in %.2fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            try:
                self._serve(conn, generation, wake_r)
            except (OSError, ClusterShmError) as exc:
                if self._generation == generation:
                    logger.warning(
                        "the listener connection was lost or cut off by the Manager (%s); events in between are "
                        "lost; subscribing again",
                        exc,
                    )
                    with self._lock:
                        self._todo = [("listen", h) for h in self._handles.values()]
            finally:
                conn.close()

    def _serve(self, conn: _Connection, generation: int, wake_r: socket.socket) -> None:
        sock = conn.sock
        reader = conn.reader
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, b"\0" * 16)  # select() decides when to read
        waiting: dict[int, Handle] = {}
        with self._lock:
            self._todo = [("listen", h) for h in self._handles.values()]
        while self._generation == generation:
            for action, handle in self._take_todo():
                if action == "listen":
                    if handle.active:
                        waiting[handle.id] = handle
                        sock.sendall(P.encode(P.LISTEN, handle.id, [handle.id, handle.ns, handle.key, handle.prefix]))
                else:
                    sock.sendall(P.encode(P.UNLISTEN, handle.id, [handle.id]))
            try:
                readable, _, _ = select.select([sock, wake_r], [], [], 1.0)
            except (OSError, ValueError):
                return  # the wake socket was closed: this generation is over
            if wake_r in readable:
                try:
                    wake_r.recv(4096)
                except OSError:
                    return
            if sock not in readable:
                continue
            data = sock.recv(256 * 1024)
            if not data:
                raise ManagerUnavailable("the Manager closed the listener connection")
            for op, rid, payload in reader.feed(data):
                body = P.decode_payload(payload)
                if op == P.PUSH_EVENT:
                    self._dispatch(*body)
                elif rid in waiting:
                    handle = waiting.pop(rid)
                    if op == P.ERR:
                        handle.error = error_from_code(body[0], body[1])
                    self._confirmed(handle)

    def _run_embedded(self, generation: int, client: EmbeddedClient) -> None:
        q: queue.Queue = queue.Queue(self.embedded_backlog)
        self._queue = q
        engine = client.engine
        with client._cond:
            session = engine.open_session(pid=os.getpid())

        def push(event, q=q):
            try:
                q.put_nowait(event)
            except queue.Full:
                logger.warning("listener events are %d behind; the oldest are dropped", self.embedded_backlog)

        session.push = push
        try:
            while self._generation == generation:
                for action, handle in self._take_todo():
                    with client._cond:
                        if client.retired:
                            return
                        try:
                            if action == "listen":
                                if handle.active:
                                    engine.dispatch(session, P.LISTEN, [handle.id, handle.ns, handle.key, handle.prefix])
                            else:
                                engine.dispatch(session, P.UNLISTEN, [handle.id])
                        except ClusterShmError as exc:
                            handle.error = exc
                    if action == "listen":
                        self._confirmed(handle)
                    else:
                        handle.subscribed.set()
                try:
                    event = q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if event is not None:
                    self._dispatch(*event)
        finally:
            with client._cond:
                if not client.retired:  # a retired engine belongs to a Manager's thread now
                    engine.close_session(session)

    # -- fork and mode changes ------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        # The dispatcher thread did not survive the fork, and the listener
        # connection was closed by the client's own at-fork hook. Subscribe
        # again, once, here: a worker must hear events without first having
        # to call the API.
        self._lock = threading.RLock()
        self._thread = None
        self._queue = None
        if self._wake_r is not None:
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        if self._handles:
            self._restart(conf.get_client())
            # Wait (a round trip) until the Manager has them again, so a
            # worker never serves a request before its listeners are live.
            timeout = float(conf.settings()["TIMEOUT"])
            deadline = time.monotonic() + timeout
            for handle in list(self._handles.values()):
                if not handle.subscribed.wait(max(0.0, deadline - time.monotonic())):
                    logger.warning("listeners of process %d not subscribed again within %.1fs after fork", os.getpid(), timeout)
                    break

    def stop(self) -> None:
        """End the dispatcher (the server is shutting down); handles stay registered."""
        with self._lock:
            self._generation += 1
            self._client = None
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def client_changed(self) -> None:
        """``conf.configure()`` moved this process to another Manager."""
        if self._handles:
            self._restart(conf.get_client())


_hub = _Hub()
os.register_at_fork(after_in_child=_hub.after_fork_in_child)


def listen(
    key: str | None = None,
    callback: Callable[[Any, Any, str], None] | None = None,
    *,
    prefix: str | None = None,
    cache: str | None = None,
    timeout: float | None = None,
    on_resync: Callable[[], None] | None = None,
) -> Handle:
    """Call ``callback(key, value, event)`` for every change of ``key`` (or of every
    key starting with ``prefix``) in the shared store, or in the cache alias ``cache``.

    Returns once the Manager has the subscription: every write that completes
    after that reaches the callback. ``callback`` may be None when only the
    Django signal :data:`~django_clustershm.signals.changed` is wanted.

    ``on_resync()`` is called (on the dispatcher thread) each time the
    subscription is made again (in a forked child, after a reconnection or a
    cut-off), once it is live: events of the gap may be lost, so a listener
    that mirrors state reloads it there.
    """
    if (key is None) == (prefix is None):
        raise TypeError("listen() takes a key or a prefix=, not both")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    ns = ""
    if cache is not None:
        from django.core.cache import caches

        from .cache import ClusterShmCache

        backend = caches[cache]
        if not isinstance(backend, ClusterShmCache):
            raise TypeError(f"cache {cache!r} is not a ClusterShmCache")
        ns = backend._location
    target = key if prefix is None else prefix
    if not isinstance(target, str):
        raise TypeError("a key or prefix is a str")
    if timeout is None:
        timeout = float(conf.settings()["TIMEOUT"])
    if on_resync is not None and not callable(on_resync):
        raise TypeError("on_resync must be callable")
    return _hub.listen(Handle(ns, target, prefix is not None, callback, on_resync), timeout)
