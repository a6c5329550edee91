"""The lock watchdog: a lock taken without a lease lives while its holder does.

On Redis nothing ties a key to a connection, so a lock taken with
``lease=None`` is stored with a lease of ``LOCK_LEASE`` seconds, and this
process's watchdog thread renews every such lock every third of its lease
while the holder lives. When the holder's process dies (even by SIGKILL) the
renewals stop and the lock is free within one lease; a holder that releases
or exits cleanly frees it at once. As on the local engine, a lock belongs to
the thread that took it (or, for an async task, to its event loop): when
that thread ends (or the loop closes) without releasing it, the watchdog
releases it.

Redisson's watchdog bugs we avoid by construction: the renewal never
outlives a release (the release drops the hold before it runs: redisson#7272);
a renewal that fails because of a connection error is retried at the next
tick rather than stopping for good (#2515, #3194); and a renewal that finds
the lock gone (the lease ran out while the process was starved: #2665)
is logged, and the holder's release or extend then raises ``LockNotOwned``.

One thread per process, started by the first hold and ended when none has
been left for :data:`LINGER` seconds; a forked child renews none of its
parent's locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..client.transport import beat, heartbeat
from ..exceptions import ClusterShmError, LockNotOwned

logger = logging.getLogger("django_clustershm")

#: Seconds the watchdog thread waits, holding nothing, before it ends.
LINGER = 5.0


def beat_if_registered() -> None:
    """A lock wait is about to block: tell the supervisor (gunicorn) this process is alive."""
    registered = heartbeat()
    if registered is not None:
        beat(registered[0])


class Watchdog:
    def __init__(self, transport: Any) -> None:  # a RedisTransport (whose module imports this one)
        self.transport = transport
        self._cond = threading.Condition(threading.Lock())
        #: token -> [key, lease_ms, alive, keep, when its next renewal is due]
        self._holds: dict[bytes, list] = {}
        #: Seconds between the thread's rounds: a third of the shortest lease it has seen.
        self._tick: float | None = None
        self._stopping = False
        #: tokens to extend at once (locks handed over with a first lease of one heartbeat)
        self._urgent: set[bytes] = set()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        self.lost = 0

    def __len__(self) -> int:
        return len(self._holds)

    def hold(
        self,
        key: str,
        token: bytes,
        lease_ms: int,
        alive: Callable[[], bool],
        keep: bool = True,
        now: bool = False,
    ) -> None:
        """Look after ``token``'s lock on ``key``: renew it every third of
        ``lease_ms`` while ``alive()`` (``keep``), and/or extend it to
        ``lease_ms`` at once (``now``: a lock handed over with a first lease of
        one heartbeat).

        The thread is woken only when it must act sooner than its next tick (a
        shorter lease than any before, an extension due now): a lock taken and
        released per request costs no thread switch (bench_redis)."""
        period = lease_ms / 3000
        with self._cond:
            self._holds[token] = [key, lease_ms, alive, keep, time.monotonic() + period]
            wake = False
            if now:
                self._urgent.add(token)
                wake = True
            if self._tick is None or period < self._tick:
                self._tick = period
                wake = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="clustershm-lock-watchdog", daemon=True)
                self._thread.start()
            elif wake:
                self._cond.notify_all()

    def drop(self, token: bytes) -> None:
        with self._cond:
            self._urgent.discard(token)
            self._holds.pop(token, None)

    def _run(self) -> None:
        cond = self._cond
        idle_since = None
        while True:
            with cond:
                if self._urgent:
                    urgent, self._urgent = self._urgent, set()
                    holds = [(t, self._holds[t]) for t in urgent if t in self._holds]
                else:
                    if self._holds:
                        idle_since = None
                    elif self._stopping:
                        self._thread = None
                        self._tick = None
                        return
                    else:
                        # Linger a while before ending (ticking, so that a new hold
                        # needs no wake-up): a view that takes and releases a lock
                        # per request would otherwise start a thread per lock
                        # (bench_redis: acquire+release 281 -> 131 us without that).
                        now = time.monotonic()
                        if idle_since is None:
                            idle_since = now
                        if now - idle_since >= LINGER:
                            self._thread = None
                            self._tick = None
                            return
                    tick = self._tick or 1.0
                    cond.wait(tick)
                    if self._urgent:
                        continue
                    due = time.monotonic() + tick / 2
                    holds = [(t, h) for t, h in self._holds.items() if h[3] and h[4] <= due]
            if holds:
                self._renew(holds)

    def _renew(self, holds) -> None:
        transport = self.transport
        ops = transport.ops
        for token, hold in holds:
            key, lease_ms, alive, keep, _due = hold
            if token not in self._holds:
                continue  # released meanwhile
            try:
                if keep and not alive():
                    logger.warning("django-clustershm: the holder of lock %r ended without releasing it: released", key)
                    transport.run(ops.lock_cancel(key, token))
                    continue
                transport.run(ops.lock_extend(key, token, lease_ms / 1000))
                hold[4] = time.monotonic() + lease_ms / 3000
                self.renewals += 1
                if not keep:
                    with self._cond:
                        self._holds.pop(token, None)
            except LockNotOwned:
                if token not in self._holds:
                    continue  # released while we renewed it
                self.lost += 1
                self.drop(token)
                logger.warning(
                    "django-clustershm: lock %r was lost before its watchdog renewed it (its lease of %d ms ran out: "
                    "the process was stalled?); its holder's release will raise LockNotOwned",
                    key,
                    lease_ms,
                )
            except ClusterShmError as exc:
                logger.warning("django-clustershm: renewing lock %r failed (%s); trying again", key, exc)

    def stop(self) -> None:
        """End the thread now if it holds nothing (the transport is shut down)."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        with self._cond:
            self._stopping = False

    def release_all(self) -> None:
        """Release every lock this process holds through the watchdog (a clean exit)."""
        with self._cond:
            holds = list(self._holds.items())
        for token, (key, *_rest) in holds:
            try:
                self.transport.run(self.transport.ops.lock_cancel(key, token))
            except ClusterShmError:
                pass

    def after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holds = {}
        self._urgent = set()
        self._thread = None
        self._tick = None
