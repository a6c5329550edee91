"""Which Manager this process talks to, and the one ordered after-fork reset.

The choice, made once per process on first use (and logged once):

1. the cluster this process was forked from (``runcluster`` or the gunicorn
   config module call :func:`configure` in the master before forking, so the
   workers inherit the address and the secret in memory: no environment
   variable or file another user could read);
2. a running cluster named by ``settings.CLUSTERSHM["ADDRESS"]`` or the
   ``CLUSTERSHM_ADDRESS`` environment variable, for a process of the same user
   that was not forked by the master (a management command, a cron job); the
   secret is read from the 0600 ``secret`` file beside the socket, or from
   ``CLUSTERSHM["SECRET_FILE"]``;
3. in a management command run from the command line (``manage.py NAME``:
   ``shell``, ``clustershm_stats``, a command of the project's), the
   project's running cluster as its runtime file records it
   (:mod:`.runtime`); if there is none, it says so on stderr
   (:data:`NO_CLUSTER`) and goes on embedded. Not in the commands of
   :data:`NEVER_ATTACH`, nor with ``CLUSTERSHM["AUTO_ATTACH"] = False``;
4. otherwise an embedded, in-process Manager (``runserver``, tests, a script).

Why only management commands: they are the tools an operator runs beside the
server, expecting to see its state (a count, a flag, a session). Anything
else that merely imports the project (a test suite under pytest, a script
that calls ``django.setup()``, ``call_command()`` from a test) keeps its own
embedded Manager, as before, so that a test run on a developer's machine
never reads or clears the state of the server that happens to be running
there. Servers are not tools: ``runcluster`` *is* the cluster, and
``runserver`` serves on its own state.

After a fork, the child runs :func:`_after_fork_in_child`, the only
``os.register_at_fork`` hook of the package, whose steps run in this order
(gunicorn's habit: one post-fork entry point, named steps; none of them in a
snapshot writer, which the Manager forks to write a copy of its state and
which touches nothing else, see :mod:`.server.snapshot`):

1. every Manager of this process closes the child's copies of its sockets
   (and a Manager that owned the process's garbage collector gives the
   child its settings back: see :mod:`.server.gcpolicy`);
2. the registry's own lock is renewed;
3. every client drops what is its parent's (connections, embedded sessions,
   lock holds, near-cache copies, the dispatcher thread) and renews every
   lock another thread may have held at the fork; nothing here blocks;
4. only then do listeners subscribe again (each client's dispatcher, with a
   bounded wait), since a listener's ``on_resync`` may call anything of the
   above.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from . import conf, runtime
from .client import Client, EmbeddedTransport, SocketTransport
from .client.client import clients
from .exceptions import ClusterShmError, ManagerUnavailable
from .server import Engine
from .server import manager as _server_manager
from .server import snapshot as _snapshot

logger = logging.getLogger("django_clustershm")

_lock = threading.Lock()
_client: Client | None = None
_cluster: tuple[str, bytes] | None = None
#: How the process-wide client was chosen: "cluster", "address", "attached" or "embedded".
_mode: str | None = None

#: Management commands that never attach by themselves: servers, and the test runners.
NEVER_ATTACH = frozenset({"runcluster", "runserver", "testserver", "test"})
#: What a management command says on stderr when it finds no running cluster.
NO_CLUSTER = "no running cluster found: embedded Manager"


def read_secret(address: str, secret_file: str | None = None) -> bytes:
    path = secret_file or os.path.join(os.path.dirname(address), "secret")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ManagerUnavailable(f"cannot read the cluster secret from {path}: {exc.strerror}") from exc


def connect(
    address: str, secret: bytes | None = None, *, secret_file: str | None = None, timeout: float | None = None
) -> Client:
    """A client of the running Manager at ``address`` (same user, same host)::

    client = django_clustershm.connect("/tmp/clustershm-x/manager.sock")
    client.get("flags:checkout")
    """
    if secret is None:
        secret = read_secret(address, secret_file)
    settings = conf.settings()
    return Client(
        SocketTransport(
            address,
            secret,
            timeout=float(settings["TIMEOUT"]) if timeout is None else timeout,
            spin=float(settings["CLIENT_SPIN"]),
        )
    )


def remote(url: str | None = None, options: dict | None = None, *, timeout: float | None = None) -> Client:
    """A client of the remote engine (Redis, Valkey) the settings name, or ``url``::

    client = django_clustershm.registry.remote("redis://127.0.0.1:6379/0")
    """
    from .redisengine import make_transport

    settings = conf.settings()
    url = url or conf.remote_engine(settings)
    if url is None:
        raise ClusterShmError("no remote ENGINE is configured (CLUSTERSHM['ENGINE'] is 'local')")
    return Client(
        make_transport(
            url,
            settings["ENGINE_OPTIONS"] if options is None else options,
            timeout=float(settings["TIMEOUT"]) if timeout is None else timeout,
            limits=conf.limits_from_settings(settings),
            secret=conf.secret_key(),
        )
    )


def embedded(engine: Engine | None = None) -> Client:
    """A client of an in-process engine built from the settings (or ``engine``)."""
    settings = conf.settings()
    if engine is None:
        engine = Engine(**conf.engine_options(settings))
    return Client(EmbeddedTransport(engine, timeout=float(settings["TIMEOUT"])))


def configure(address: str | None, secret: bytes | None = None, *, listeners: bool = True, adopt=()) -> None:
    """Point this process (and the processes it forks) at a Manager.

    ``configure(None)`` goes back to choosing from the settings on next use.
    Registered listeners move to the new Manager, unless ``listeners=False``;
    ``adopt`` adds handles taken from a client stopped earlier.
    """
    global _client, _cluster, _mode
    with _lock:
        _cluster = None if address is None else (address, secret if secret is not None else read_secret(address))
        old, _client, _mode = _client, None, None
    handles = list(adopt) + (old.shutdown() if old is not None else [])
    if old is not None:
        old.close()
        old.transport.shutdown()  # a remote engine's pools and watchdog go with it
    if listeners and handles:
        new = get_client()
        refused = new.transport.refuses.get("listen")
        if refused:
            logger.warning("django-clustershm: %d listener(s) dropped: %s", len(handles), refused)
            return
        new.dispatcher.adopt(handles, new.transport.timeout)


def cluster() -> tuple[str, bytes] | None:
    """The (address, secret) this process was configured with, if any."""
    return _cluster


def current() -> Client | None:
    """The process-wide client if one was made (no connection is made here)."""
    return _client


def get_client() -> Client:
    """The process-wide client behind ``django_clustershm.get()`` and friends."""
    client = _client
    if client is None:
        client = _make_client()
    return client


def mode() -> str | None:
    """How this process's client was chosen, once it was: ``"remote"`` (the
    ENGINE setting names Redis or Valkey), ``"cluster"`` (forked by the
    master), ``"address"`` (configured), ``"attached"`` (the runtime file, in
    a management command) or ``"embedded"``."""
    return _mode


def auto_attaches() -> bool:
    """Whether this process would look for the project's running cluster
    (rule 3 of the module's docstring)."""
    command = runtime.management_command()
    return command is not None and command not in NEVER_ATTACH and bool(conf.settings()["AUTO_ATTACH"])


def _attach_running() -> Client | None:
    """A client of the project's running cluster, connected; None if none answers."""
    found = runtime.find_running()
    if found is None:
        return None
    try:
        client = connect(found["address"], secret_file=found["secret_file"])
        client.transport.limits  # noqa: B018 - connects: a recorded cluster that does not answer is not running
    except ClusterShmError as exc:
        logger.warning("django-clustershm: the cluster recorded in %s does not answer: %s", found["path"], exc)
        return None
    logger.info(
        "django-clustershm: attached to the running cluster (master pid %d), Manager at %s",
        found["pid"],
        found["address"],
    )
    return client


def _make_client() -> Client:
    global _client, _mode
    with _lock:
        if _client is not None:
            return _client
        settings = conf.settings()
        engine_url = conf.remote_engine(settings)
        if engine_url is not None:
            client = remote(engine_url)
            _mode = "remote"
            logger.info(
                "django-clustershm: %s engine at %s",
                client.capabilities()["engine"],
                getattr(client.transport, "where", "?"),
            )
        elif _cluster is not None:
            address, secret = _cluster
            client = connect(address, secret)
            _mode = "cluster"
            logger.info("django-clustershm: cluster mode, Manager at %s", address)
        elif settings["ADDRESS"] or os.environ.get("CLUSTERSHM_ADDRESS"):
            address = settings["ADDRESS"] or os.environ["CLUSTERSHM_ADDRESS"]
            client = connect(address, secret_file=settings["SECRET_FILE"])
            _mode = "address"
            logger.info("django-clustershm: attached to the Manager at %s", address)
        else:
            attached = None
            command = runtime.management_command()
            if auto_attaches():
                attached = _attach_running()
                if attached is None:
                    sys.stderr.write(NO_CLUSTER + "\n")
                    sys.stderr.flush()
            if attached is not None:
                client = attached
                _mode = "attached"
            else:
                client = embedded()
                _mode = "embedded"
                if command == "runcluster":
                    # runcluster's own process before it becomes the master: ready()
                    # code ran on an embedded Manager that serves no one (#18). Saying
                    # "state is not shared" at the start of the command that shares it
                    # would tell the user to do what they just did.
                    logger.debug("django-clustershm: runcluster's setup process uses an embedded Manager")
                else:
                    logger.info(
                        "django-clustershm: embedded mode (in-process Manager; state is not shared between processes)"
                    )
        near = conf.near_options(settings["NEAR_CACHE"])
        if near is not None:
            client.enable_near_cache("", *near)
        _client = client
        return client


def reset() -> None:
    """Forget the process-wide client (tests, and after settings change)."""
    configure(None)


def _after_fork_in_child() -> None:
    global _lock
    if _snapshot.in_writer_child():
        return  # a snapshot writer: it touches none of this, and must take no lock (server/snapshot.py)
    _server_manager.forget_in_child()  # 1
    _lock = threading.Lock()  # 2
    forked = clients()
    for client in forked:  # 3
        client.after_fork()
    for client in forked:  # 4
        client.resume_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _release_at_exit() -> None:
    """At a clean exit (a gunicorn worker's too: it leaves by SystemExit), a
    remote engine's client gives back what others would otherwise wait a lease
    for: the locks it holds, its strict near-cache and listener sessions. (A
    Manager sees its clients' connections close; Redis only sees leases end.)"""
    current = _client
    if current is None or _mode != "remote":
        return
    try:
        current.shutdown()
        current.transport.shutdown()
    except Exception:  # exiting: say it, and go on exiting
        logger.warning("django-clustershm: could not release this process's locks and sessions", exc_info=True)


atexit.register(_release_at_exit)
