"""A worker's lifeline to its master: set up in each worker by the ``post_fork`` hook.

Two things a gunicorn worker of ``runcluster`` needs that gunicorn alone
does not give it:

**It dies with its master.** A master killed with SIGKILL runs no hook: its
Manager is gone, but its workers kept serving (500 ``ManagerUnavailable``)
and held the port: a sync worker looks at its parent only when it is idle
(every ``--timeout``/2 seconds), an ASGI worker never. So each worker

1. asks the kernel to send it SIGTERM when its master dies
   (``prctl(PR_SET_PDEATHSIG)`` on Linux): its own graceful stop, which stops
   accepting at once;
2. runs a watcher thread that waits for the master to exit (on a pidfd where
   the kernel has them, else by looking at its parent pid 4 times a second),
   sends that SIGTERM itself where the kernel could not, and ends the worker
   with ``os._exit`` :data:`ORPHAN_GRACE` seconds later, whatever the
   requests in flight are doing: a view asleep, or one waiting for the
   Manager, would otherwise hold the port for as long as it takes.

The master is the process that forked the worker: gunicorn's arbiter forks
from its main thread, which is what the parent-death signal watches.

**A stop that comes while it boots is not lost.** Until gunicorn's worker
installs its own signal handlers (``init_signals``, after ``post_fork``), a
new worker still has the arbiter's, which queue the signal in the worker's
copy of the arbiter's queue, where nothing reads it (gunicorn #1910): a
worker forked just before a stop or a reload (after another died, or at
start on a loaded machine) then booted and served on, and the master
SIGKILLed it at the end of ``--graceful-timeout``, leaving it to init to
reap. ``post_fork`` now notes a SIGTERM, SIGINT or SIGQUIT from its first
line on (:func:`catch_early_stop`), and ``post_worker_init`` ends a worker
that got one before it serves anything (:func:`exit_if_stopped_early`).

**Its lock waits are not hangs.** gunicorn's arbiter kills a worker whose
heartbeat (``worker.notify()``) is older than ``--timeout``; a sync worker
beats only between requests, so a view waiting for a lock longer than that
was killed as hung. The hook registers ``worker.notify`` as the client's
heartbeat (:func:`..client.transport.set_heartbeat`), which a lock wait calls
while it blocks: the lock's own timeout decides. ASGI workers get none: their
event loop beats for them, and a lock wait there does not block it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time

from ..client.transport import set_heartbeat

logger = logging.getLogger("django_clustershm.cluster")

#: Seconds the requests in flight get once the master is gone (gunicorn's
#: graceful stop would give them --graceful-timeout, but without a master
#: the Manager is gone too, and the port must be freed for a restart).
ORPHAN_GRACE = 1.0
#: Seconds between two looks at the parent pid where there is no pidfd.
POLL_INTERVAL = 0.25
#: The exit status of a worker that outlived its master (no one reads it:
#: the worker's new parent is init, or a subreaper).
EXIT_ORPHANED = 1

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def _prctl(option: int, arg) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(ctypes.c_int(option), arg, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError, ctypes.ArgumentError):
        return False


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies
    (Linux); False where that cannot be done."""
    return _prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig))


def parent_death_signal() -> int:
    """The signal set by :func:`set_parent_death_signal` and still in force
    (a change of credentials clears it); 0 if none or unknown."""
    value = ctypes.c_int(0)
    return value.value if _prctl(_PR_GET_PDEATHSIG, ctypes.byref(value)) else 0


def wait_for_exit(master_pid: int) -> None:
    """Return once ``master_pid``, this process's parent, is gone."""
    try:
        fd = os.pidfd_open(master_pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone
        fd = None
    if fd is not None:
        try:
            if os.getppid() == master_pid:  # so the pidfd is the master's, not a recycled pid's
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll()  # readable when the process exits
            return
        finally:
            os.close(fd)
    while os.getppid() == master_pid:
        time.sleep(POLL_INTERVAL)


def _watch(master_pid: int, grace: float) -> None:
    wait_for_exit(master_pid)
    logger.warning(
        "django-clustershm: the master (pid %d) is gone; worker %d stops serving and exits within %.1fs",
        master_pid,
        os.getpid(),
        grace,
    )
    if parent_death_signal() != signal.SIGTERM:  # else the kernel has sent it already
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop: no more accepts
    time.sleep(grace)
    os._exit(EXIT_ORPHANED)


def watch_master(master_pid: int, grace: float = ORPHAN_GRACE) -> threading.Thread:
    """Stop this worker when ``master_pid`` dies (see the module's docstring)."""
    set_parent_death_signal(signal.SIGTERM)
    thread = threading.Thread(target=_watch, args=(master_pid, grace), name="clustershm-lifeline", daemon=True)
    thread.start()
    return thread


#: The signals that stop a gunicorn worker (SIGTERM gracefully, the others at once).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: The first stop signal this worker got before gunicorn's handlers took over (see catch_early_stop).
_early_stop: int | None = None


def _note_stop(signum: int, frame) -> None:
    global _early_stop
    if _early_stop is None:
        _early_stop = signum


def catch_early_stop() -> None:
    """In a new worker, first thing: note a stop signal instead of the
    arbiter's inherited handlers losing it (until gunicorn installs the
    worker's own; see the module's docstring)."""
    global _early_stop
    _early_stop = None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note_stop)


def exit_if_stopped_early(worker) -> None:
    """gunicorn's ``post_worker_init``: end a worker that was told to stop
    while it booted, before it serves anything (status 0, as a stop's)."""
    if _early_stop is not None:
        logger.info(
            "django-clustershm: worker %d got %s while it booted; exiting before it serves",
            os.getpid(),
            signal.Signals(_early_stop).name,
        )
        sys.exit(0)


def post_fork(server, worker) -> None:
    """gunicorn's ``post_fork`` hook, in the new worker: a stop signal noted
    until gunicorn's handlers take over, its lifeline, and its heartbeat
    during lock waits."""
    from .asgi import is_asgi_worker

    catch_early_stop()
    watch_master(server.pid)
    if worker.timeout and not is_asgi_worker(type(worker)):
        # worker.timeout is gunicorn's --timeout / 2: the cadence at which
        # gunicorn's own workers notify.
        set_heartbeat(worker.notify, worker.timeout)
