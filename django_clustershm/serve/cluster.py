"""The Manager inside a gunicorn master: shared by ``runcluster`` and the gunicorn config module.

The master starts the Manager before the arbiter forks any worker, and points
its own process-wide client at it (:func:`~..registry.configure`); the workers
inherit that configuration (address and secret) in memory through fork. The
hooks used are gunicorn's documented server hooks:

* ``on_starting`` starts the Manager (in a thread of the master), then runs
  the project's start-up code once, in a child (:func:`run_start_up`);
* ``post_fork`` gives each worker its lifeline (:mod:`.lifeline`): it exits
  within a second or so if the master dies, even by SIGKILL, and a lock wait
  keeps its heartbeat going;
* ``child_exit`` tells the Manager a worker died, so whatever it held is
  released at once even if one of its descriptors outlived it;
* ``on_exit`` stops the Manager and removes its socket directory.

**The master holds no project code** (#13): a worker forked after a SIGHUP
(or a ``--reload``) must import the project afresh, so the master never
imports it. It reads the settings the Manager needs in a throwaway child
(:func:`manager_settings_in_child`: importing the settings module would pin it
too), and the project's start-up code runs in another child, after the
Manager started and before any worker: ``django.setup()`` (every
``AppConfig.ready()``) and then ``CLUSTERSHM["ON_START"]``, a dotted path
to a function called once per cluster start. What they store is in the
Manager before the first request, as in the seed, where the master declares
the shared memory before it forks. ``ready()`` also runs in each worker when
it loads the application (so listeners registered there are live in every
worker before it serves): keep it idempotent (``add``, not ``set``), and put
once-per-start state in ``ON_START``.

With gunicorn's ``--preload`` the master does import the project (gunicorn
loads it there); its ``ready()`` writes then reach the Manager through the
socket, and a SIGHUP does not reload that code (gunicorn's own caveat).

At start the master also removes the socket directories that dead masters
of its user left behind, and records its Manager in the project's runtime
file, where management commands find it (:mod:`..runtime`); a clean stop
removes that file.
"""

from __future__ import annotations

import json
import logging
import os
import signal

from .. import conf, registry, runtime
from ..client import EmbeddedTransport
from ..client.transport import LOCAL_CAPABILITIES
from ..server import Engine, Limits, Manager, snapshot
from . import lifeline

logger = logging.getLogger("django_clustershm.cluster")

_manager: Manager | None = None


def manager() -> Manager | None:
    """The Manager this process started, if any."""
    return _manager


def _in_child(fn, *args):
    """``fn(*args)`` in a forked child; its JSON result, or RuntimeError with the child's sentence.

    The child writes with os-level calls only and leaves with ``os._exit``:
    nothing it imports (the project, its settings) stays in this process.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            try:
                payload = {"ok": fn(*args)}
            except BaseException as exc:
                payload = {"error": f"{type(exc).__name__}: {exc}"}
                code = 1
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    try:
        payload = json.loads(data)
    except ValueError:
        raise RuntimeError("the child process died without an answer") from None
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["ok"]


def _read_manager_settings() -> dict:
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        from django.conf import settings

        settings.DEBUG  # noqa: B018 - loads the settings module (conf.settings() reads only loaded ones)
    options = conf.engine_options()
    options["limits"] = options["limits"].as_dict()
    remote = None
    url = conf.remote_engine()
    if url is not None:
        # Checked here, in the child: a bad URL or option stops runcluster with one sentence.
        from ..redisengine import EngineConfig
        from ..redisengine.ops import Capabilities

        remote = Capabilities.redis(EngineConfig.parse(url, conf.settings()["ENGINE_OPTIONS"]))
        remote["address"] = EngineConfig.parse(url).description
    return {
        "engine": options,
        "snapshot": conf.settings().get("SNAPSHOT"),
        "project": runtime.project_key(),
        "remote": remote,
    }


#: The project's key among runtime files (runtime.project_key), read with the settings.
_project: str | None = None
#: The remote engine's capabilities (and "address"), when ENGINE names one: no Manager then.
_remote: dict | None = None


def manager_settings_in_child() -> tuple[dict, dict | None]:
    """The Manager's engine options and its SNAPSHOT setting, read in a child (the
    master imports no settings module: workers must load it afresh after a SIGHUP)."""
    global _project, _remote
    found = _in_child(_read_manager_settings)
    options = found["engine"]
    options["limits"] = Limits(**options["limits"])
    _project = found["project"]
    _remote = found["remote"]
    return options, found["snapshot"]


def remote_engine() -> dict | None:
    """What the remote engine guarantees (and where it is), if ENGINE names one
    (known once :func:`start_manager` read the settings)."""
    return _remote


def describe_capabilities(capabilities: dict) -> str:
    """One log line of an engine's guarantees."""
    return "; ".join(f"{name.replace('_', ' ')}: {value}" for name, value in capabilities.items() if name != "address")


def _start_up() -> None:
    import django

    django.setup()  # every AppConfig.ready(), against the cluster's Manager
    hook = conf.settings().get("ON_START")
    if hook:
        from django.utils.module_loading import import_string

        import_string(hook)()


_started_up = False


def run_start_up() -> None:
    """The project's start-up code, once per cluster start, in a child, before any worker:
    ``django.setup()`` (every ``ready()``) and ``CLUSTERSHM["ON_START"]``."""
    global _started_up
    if _started_up or os.environ.get("DJANGO_SETTINGS_MODULE") is None:
        return  # done already, or not a Django project: nothing to set up
    _started_up = True
    try:
        _in_child(_start_up)
    except RuntimeError as exc:
        raise RuntimeError(f"django-clustershm: the project's start-up code failed: {exc}") from None


def start_manager(own_gc: bool = False) -> Manager | None:
    """Start the Manager in this (master) process, once; return it. With a
    remote ENGINE (Redis, Valkey) there is none to start: every worker, on
    every host, reaches the engine itself. Either way the engine's guarantees
    are logged. ``own_gc``: the process exists to serve the Manager (the
    lean master of ``runcluster``, not a gunicorn master of the user's own
    config), so the Manager takes over its garbage collector (see
    :mod:`..server.gcpolicy`)."""
    global _manager
    if _manager is not None:
        return _manager
    runtime.remove_stale_socket_dirs()
    options, snapshot_setting = manager_settings_in_child()
    if _remote is not None:
        logger.info(
            "django-clustershm: %s engine at %s, no Manager in the master; guarantees: %s",
            _remote["engine"],
            _remote["address"],
            describe_capabilities(_remote),
        )
        return None
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
        engine = Engine(**options)
    snapshot_config = _restore_snapshot(engine, snapshot_setting)  # before any worker exists
    _manager = Manager(engine=engine, snapshot=snapshot_config, own_gc=own_gc)  # writes the snapshot when it stops
    runtime.mark_socket_dir(_manager.address)
    _manager.on_failure = _manager_died
    _manager.start()
    registry.configure(_manager.address, _manager.secret, adopt=handles)
    runtime.record(_manager.address, _manager.secret_file, _project)
    logger.info("django-clustershm: Manager started in the master (pid %d) on %s", os.getpid(), _manager.address)
    logger.info("django-clustershm: local engine; guarantees: %s", describe_capabilities(LOCAL_CAPABILITIES))
    return _manager


#: The master's exit status when its Manager died (EX_SOFTWARE), so that a
#: supervisor restarts the whole server instead of workers serving 500s forever.
EXIT_MANAGER_DIED = 70
_failed = False


def manager_failed() -> bool:
    """Whether this master's Manager died (its loop raised)."""
    return _failed


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


# -- snapshots (CLUSTERSHM["SNAPSHOT"], see server/snapshot.py) ------------------


def _restore_snapshot(engine: Engine, setting: dict | None) -> snapshot.SnapshotConfig | None:
    """Restore the snapshot into ``engine``; the config for the Manager, or None if off.

    A server that must not start (ON_ERROR "refuse", or a SNAPSHOT setting
    that cannot work) says why in one sentence and exits with status 78
    (EX_CONFIG): no traceback, and a supervisor can be told not to restart it
    (systemd: ``RestartPreventExitStatus=78``).
    """
    try:
        config = snapshot.config_from_settings(setting)
        if config is not None:
            snapshot.restore_at_start(engine, config)
    except snapshot.SnapshotRefused as exc:
        logger.critical("django-clustershm: %s", exc)
        raise SystemExit(snapshot.EXIT_REFUSED) from None
    return config


# -- gunicorn server hooks ------------------------------------------------------


def master_logging() -> None:
    """The master's own log lines (the Manager's: started, snapshot restored,
    bad peers) to stderr, as gunicorn's are: the master does not load the
    project's settings, so its LOGGING does not apply here (it does in workers)."""
    log = logging.getLogger("django_clustershm")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def on_starting(server) -> None:
    master_logging()
    start_manager()
    try:
        run_start_up()
    except RuntimeError as exc:
        logger.critical("%s", exc)
        stop_manager()
        raise SystemExit(1) from None


def post_fork(server, worker) -> None:
    lifeline.post_fork(server, worker)


def post_worker_init(worker) -> None:
    lifeline.exit_if_stopped_early(worker)


def child_exit(server, worker) -> None:
    if _manager is not None:
        _manager.forget_pid(worker.pid)


def on_exit(server) -> None:
    stop_manager()
    if _failed:
        raise SystemExit(EXIT_MANAGER_DIED)  # out of gunicorn's halt(), instead of its exit 0


HOOKS = {
    "on_starting": on_starting,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "child_exit": child_exit,
    "on_exit": on_exit,
}


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
