"""The listener dispatcher: one push channel and one thread per client, running the callbacks.

Each :class:`~.client.Client` that has listeners owns one :class:`Dispatcher`:
a channel (:meth:`~.transport.Transport.open_channel`) on which it subscribes
each :class:`Handle`, and a thread that runs the callbacks, in the order of
the writes to each key. An exception in a callback is logged and delivery
goes on. Every event is also given to the module-level :data:`observers`
(the Django signal :data:`django_clustershm.signals.changed` is one).

**What a listener sees, precisely** (tested in ``tests/test_listeners.py``):

* Every listening process hears every change of its keys that completes
  after :func:`listen` returned, in the order of the writes to each key.
* In *another* process, the event is in the listener's channel before the
  writer's call returns (the Manager writes it before the reply); its
  callback runs as soon as that process's dispatcher thread reads it.
* In the *writer's own* process, the callbacks for that write have run when
  the writer's call returns: after a write of a key this process listens to,
  the call waits for a barrier on the dispatcher's channel (a PING whose
  reply comes after every event queued before it). Not when the write is
  made from a callback (the dispatcher thread cannot wait for itself), and
  not longer than the client's timeout (a dispatcher that is reconnecting
  is not waited for: its events of the gap are lost anyway, see on_resync).
* A process that does not read its events fast enough is cut off (16 MiB
  behind over a socket, 100,000 events embedded): its channel is closed, the
  events pending for it are dropped, and the dispatcher logs that, opens a
  new channel, subscribes again and calls ``on_resync``.

Listeners survive fork: a listener registered before a fork (in an
``AppConfig.ready()``, which ``runcluster`` runs in the master) is subscribed
again, once, in each child, before the child runs any request; and they move
with the process from the embedded Manager to a cluster's (:meth:`adopt`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import ClusterShmError, ManagerUnavailable, error_from_code
from ..wire import frames as F
from .transport import Channel, Transport

logger = logging.getLogger("django_clustershm.listen")

#: Called as ``observer(ns, key, value, event, handle)`` for every event a
#: handle receives, after its callback (django_clustershm.signals adds one).
observers: list[Callable] = []

_ids = itertools.count(1)


class Handle:
    """One subscription; :meth:`cancel` stops its delivery."""

    def __init__(
        self,
        ns: str,
        key: str,
        prefix: bool,
        callback: Callable | None,
        on_resync: Callable | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.ns = ns
        self.key = key
        self.prefix = prefix
        self.callback = callback
        self.on_resync = on_resync
        self.decode = decode
        self.active = True
        self.delivered = 0
        self.subscriptions = 0  # how many times the Manager confirmed it (1 + resubscriptions)
        self.subscribed = threading.Event()
        self.error: BaseException | None = None
        self.dispatcher: Dispatcher | None = None

    def __repr__(self) -> str:
        what = f"prefix={self.key!r}" if self.prefix else f"key={self.key!r}"
        return f"<Handle {what} ns={self.ns!r} active={self.active}>"

    def cancel(self) -> None:
        """Stop delivery to this handle (no callback runs for it afterwards)."""
        if self.active:
            self.active = False
            if self.dispatcher is not None:
                self.dispatcher.cancel(self)


class _Barrier:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Dispatcher:
    """A client's listener channel and dispatcher thread."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self.handles: dict[int, Handle] = {}
        # ns -> (exact keys, prefixes) of the active handles: what a write of
        # this process must wait for (see sync); rebuilt on every change.
        self._index: dict[str, tuple[frozenset, tuple]] = {}
        self._todo: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._channel: Channel | None = None
        self._generation = 0
        self._stop = threading.Event()

    # -- the API side ------------------------------------------------------------------

    def add(self, handle: Handle, timeout: float) -> Handle:
        """Subscribe ``handle``; return once the Manager has it (every write
        that completes after that reaches the callback)."""
        handle.dispatcher = self
        with self._lock:
            self.handles[handle.id] = handle
            self._reindex()
            self._request("listen", handle)
            self._ensure_running()
        if not handle.subscribed.wait(timeout):
            handle.cancel()
            raise ManagerUnavailable(f"the listener was not subscribed within {timeout}s")
        if handle.error is not None:
            handle.active = False
            with self._lock:
                self.handles.pop(handle.id, None)
                self._reindex()
            raise handle.error
        return handle

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            if self.handles.pop(handle.id, None) is not None:
                self._reindex()
                self._request("unlisten", handle)

    def listens(self, ns: str, keys) -> bool:
        """Whether a write of ``keys`` (None: the whole namespace) in ``ns`` reaches a handle here."""
        index = self._index.get(ns)
        if index is None:
            return False
        if keys is None:
            return True
        exact, prefixes = index
        for key in keys:
            if key in exact:
                return True
            for prefix in prefixes:
                if key.startswith(prefix):
                    return True
        return False

    def sync(self, timeout: float) -> None:
        """Return once every event the Manager has queued for this process so
        far has been dispatched (callbacks run). No-op on the dispatcher thread."""
        if threading.current_thread() is self._thread:
            return
        barrier = _Barrier()
        with self._lock:
            if self._thread is None:
                return
            self._request("sync", barrier)
        if not barrier.done.wait(timeout):
            logger.warning("listeners of process %d did not catch up within %.1fs", os.getpid(), timeout)

    def _reindex(self) -> None:
        index: dict[str, tuple[set, list]] = {}
        for handle in self.handles.values():
            exact, prefixes = index.setdefault(handle.ns, (set(), []))
            if handle.prefix:
                prefixes.append(handle.key)
            else:
                exact.add(handle.key)
        self._index = {ns: (frozenset(exact), tuple(prefixes)) for ns, (exact, prefixes) in index.items()}

    def _request(self, action: str, obj) -> None:
        """Under the lock: queue an action for the dispatcher thread and wake it."""
        self._todo.append((action, obj))
        if self._channel is not None:
            self._channel.wake()

    # -- the dispatcher thread -------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._generation += 1
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._generation, self._stop), name="clustershm-listeners", daemon=True
            )
            self._thread.start()

    def _take_todo(self) -> list:
        with self._lock:
            todo, self._todo = self._todo, []
        return todo

    def _confirmed(self, handle: Handle) -> None:
        """The Manager has the subscription (again). After the first time (a
        fork, a reconnection, a cut-off), events may have been missed in
        between: ``on_resync()`` lets the owner reload what it mirrors."""
        handle.subscriptions += 1
        if handle.subscriptions > 1 and handle.on_resync is not None and handle.error is None:
            try:
                handle.on_resync()
            except Exception:
                logger.exception("on_resync of %r raised", handle)
        # Only now: a forked worker serves no request before its mirrors are reloaded.
        handle.subscribed.set()

    def _dispatch(self, sub_id: int, ns: str, key, event: int, value) -> None:
        handle = self.handles.get(sub_id)
        if handle is None or not handle.active:
            return
        name = F.EVENT_NAMES.get(event, str(event))
        try:
            obj = value if value is None or handle.decode is None else handle.decode(value)
        except Exception:
            logger.exception("cannot unpickle the value of %r for a listener", key)
            obj = None
        handle.delivered += 1
        if handle.callback is not None:
            try:
                handle.callback(key, obj, name)
            except Exception:
                logger.exception(
                    "listener callback %r raised on %s of %r; delivery goes on", handle.callback, name, key
                )
        for observer in observers:
            try:
                observer(ns, key, obj, name, handle)
            except Exception:
                logger.exception("a listener observer raised")

    def _run(self, generation: int, stop: threading.Event) -> None:
        backoff = 0.05
        while self._generation == generation:
            try:
                channel = self.transport.open_channel()
            except ClusterShmError as exc:
                logger.warning("listener channel failed (%s); retrying in %.2fs", exc, backoff)
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            with self._lock:
                if self._generation != generation:
                    channel.close()
                    return
                self._channel = channel
                # (Re)subscribe everything; barriers queued before the channel
                # existed are answered by this channel's first PING.
                self._todo = [("listen", h) for h in self.handles.values()] + [
                    item for item in self._todo if item[0] == "sync"
                ]
            try:
                self._serve(channel, generation)
            except ClusterShmError as exc:
                if self._generation == generation:
                    logger.warning(
                        "the listener channel was lost or cut off by the Manager (%s); events in between are "
                        "lost; subscribing again",
                        exc,
                    )
            finally:
                with self._lock:
                    if self._channel is channel:
                        self._channel = None
                channel.close()

    def _serve(self, channel: Channel, generation: int) -> None:
        waiting: dict[int, tuple[str, Any]] = {}
        try:
            while self._generation == generation:
                for action, obj in self._take_todo():
                    rid = channel.next_rid()
                    if action == "listen":
                        if obj.active:
                            waiting[rid] = (action, obj)
                            channel.send(F.LISTEN, rid, [obj.id, obj.ns, obj.key, obj.prefix])
                    elif action == "unlisten":
                        channel.send(F.UNLISTEN, rid, [obj.id])
                    else:  # sync: a barrier behind every event queued so far
                        waiting[rid] = (action, obj)
                        channel.send(F.PING, rid, [])
                for op, rid, body in channel.receive(1.0):
                    if op == F.PUSH_EVENT:
                        self._dispatch(*body)
                        continue
                    item = waiting.pop(rid, None)
                    if item is None:
                        continue
                    action, obj = item
                    if action == "sync":
                        obj.done.set()
                    else:
                        if op == F.ERR:
                            obj.error = error_from_code(body[0], body[1])
                        self._confirmed(obj)
        finally:
            # A barrier whose channel is gone is not waited for (its events are lost).
            for action, obj in waiting.values():
                if action == "sync":
                    obj.done.set()

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> list[Handle]:
        """End the thread and close the channel; return the handles, which are
        no longer this dispatcher's (give them to another's :meth:`adopt`)."""
        with self._lock:
            self._generation += 1
            self._stop.set()
            channel, thread = self._channel, self._thread
            self._thread = None
            if channel is not None:
                channel.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        for action, obj in self._take_todo():
            if action == "sync":
                obj.done.set()
        with self._lock:
            handles, self.handles = list(self.handles.values()), {}
            self._reindex()
        return handles

    def adopt(self, handles: list[Handle], timeout: float) -> None:
        """Take over ``handles`` from another client's dispatcher (the process
        moved to another Manager); wait until they are subscribed here."""
        for handle in handles:
            handle.subscribed.clear()
            handle.dispatcher = self
        with self._lock:
            for handle in handles:
                self.handles[handle.id] = handle
                self._request("listen", handle)
            self._reindex()
            if self.handles:
                self._ensure_running()
        self._wait_subscribed(handles, timeout)

    def _wait_subscribed(self, handles, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for handle in handles:
            if not handle.subscribed.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("listeners of process %d not subscribed within %.1fs", os.getpid(), timeout)
                return

    def after_fork(self) -> None:
        """In a forked child: the thread did not survive the fork, and the
        channel is the parent's (the transport closed the child's copy)."""
        self._lock = threading.Lock()
        self._thread = None
        self._channel = None
        self._stop = threading.Event()
        self._todo = [item for item in self._todo if item[0] != "sync"]
        for handle in self.handles.values():
            handle.subscribed.clear()

    def resume(self, timeout: float) -> None:
        """After :meth:`after_fork`: subscribe again, once, and wait (bounded)
        until the Manager has them, so a worker never serves a request before
        its listeners are live."""
        if not self.handles:
            return
        with self._lock:
            self._todo = []
            self._ensure_running()
        self._wait_subscribed(list(self.handles.values()), timeout)
