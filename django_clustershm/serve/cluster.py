"""The Manager inside a gunicorn master: shared by ``runcluster`` and the gunicorn config module.

The master starts the Manager before the arbiter forks any worker, and points
its own process-wide client at it (:func:`~..registry.configure`); the workers
inherit that configuration (address and secret) in memory through fork. The
hooks used are gunicorn's documented server hooks:

* ``on_starting`` starts the Manager (in a thread of the master);
* ``post_fork`` gives each worker its lifeline (:mod:`.lifeline`): it exits
  within a second or so if the master dies, even by SIGKILL, and a lock wait
  keeps its heartbeat going;
* ``child_exit`` tells the Manager a worker died, so whatever it held is
  released at once even if one of its descriptors outlived it;
* ``on_exit`` stops the Manager and removes its socket directory.

At start the master also removes the socket directories that dead masters
of its user left behind, and records its Manager in the project's runtime
file, where management commands find it (:mod:`..runtime`); a clean stop
removes that file.

What the master wrote before the Manager started (for example initial state
set in an ``AppConfig.ready()``, which runs in the master when Django is set
up there) is not lost: the Manager adopts the master's embedded engine, so
the workers see it, as in the seed, where the master declares the shared
memory before it forks.
"""

from __future__ import annotations

import logging
import os
import signal

from .. import conf, registry, runtime
from ..client import EmbeddedTransport
from ..server import Engine, Manager
from . import lifeline

logger = logging.getLogger("django_clustershm.cluster")

_manager: Manager | None = None


def manager() -> Manager | None:
    """The Manager this process started, if any."""
    return _manager


def start_manager() -> Manager:
    """Start the Manager in this (master) process, once; return it."""
    global _manager
    if _manager is not None:
        return _manager
    runtime.remove_stale_socket_dirs()
    settings = conf.settings()
    current = registry.current()
    handles = []
    if current is not None and isinstance(current.transport, EmbeddedTransport):
        # Adopt what the master stored before the cluster started. From now on
        # only the Manager's thread may touch that engine: stop the embedded
        # client's listeners and retire its transport (its sessions are closed
        # now; listeners subscribe again through the socket when configure()
        # below moves this process to the cluster).
        handles = current.shutdown()  # for configure() below to move to the cluster
        engine = current.transport.retire()
    else:
        engine = Engine(**conf.engine_options(settings))
    _manager = Manager(engine=engine)
    runtime.mark_socket_dir(_manager.address)
    _manager.on_failure = _manager_died
    _manager.start()
    registry.configure(_manager.address, _manager.secret, adopt=handles)
    runtime.record(_manager.address, _manager.secret_file)
    logger.info("django-clustershm: Manager started in the master (pid %d) on %s", os.getpid(), _manager.address)
    return _manager


#: The master's exit status when its Manager died (EX_SOFTWARE), so that a
#: supervisor restarts the whole server instead of workers serving 500s forever.
EXIT_MANAGER_DIED = 70
_failed = False


def _manager_died(exc: BaseException) -> None:
    """The Manager's loop died (on its thread): stop the server, non-zero."""
    global _failed
    _failed = True
    logger.critical(
        "django-clustershm: the Manager died (%r); stopping the server with exit status %d "
        "rather than serving without it",
        exc,
        EXIT_MANAGER_DIED,
    )
    os.kill(os.getpid(), signal.SIGTERM)  # the arbiter's own graceful stop; on_exit sets the status


def stop_manager() -> None:
    """Stop the Manager at the server's exit (its listeners first, quietly)."""
    global _manager
    if _manager is not None:
        runtime.forget()
        client = registry.current()
        if client is not None:
            client.shutdown()
        _manager.close()
        _manager = None
        registry.configure(None, listeners=False)


# -- gunicorn server hooks ------------------------------------------------------


def on_starting(server) -> None:
    start_manager()


def post_fork(server, worker) -> None:
    lifeline.post_fork(server, worker)


def child_exit(server, worker) -> None:
    if _manager is not None:
        _manager.forget_pid(worker.pid)


def on_exit(server) -> None:
    stop_manager()
    if _failed:
        raise SystemExit(EXIT_MANAGER_DIED)  # out of gunicorn's halt(), instead of its exit 0


HOOKS = {"on_starting": on_starting, "post_fork": post_fork, "child_exit": child_exit, "on_exit": on_exit}


def chain(ours, theirs):
    """A hook that runs ours and then the user's (``on_exit``: theirs first,
    so that it can still use the Manager). gunicorn checks a hook's arity,
    so the result takes exactly the arguments of the hook it stands for.
    """
    if theirs is None or theirs is ours:
        return ours
    if ours in (child_exit, post_fork):

        def hook2(server, worker):
            ours(server, worker)
            theirs(server, worker)

        return hook2
    if ours is on_exit:

        def hook_exit(server):
            try:
                theirs(server)
            finally:
                ours(server)

        return hook_exit

    def hook1(server):
        ours(server)
        theirs(server)

    return hook1
