"""The lean master that ``runcluster`` re-executes into: the Manager and gunicorn's arbiter, no project code.

``manage.py`` sets Django up before any command runs, so the process that
parses ``runcluster``'s options has imported the whole project (apps,
models, views through the checks): workers forked from it after a SIGHUP
would inherit the old modules, and a reload would reload nothing (#13).
So ``runcluster`` checks what it can there, then replaces itself (same pid,
``os.execve``) with this module, which imports only the Manager, gunicorn and
Django as a library. The Manager's settings are read in a throwaway child,
the project's start-up code runs in another (:mod:`.cluster`), and each
worker imports the project when it loads the application, after the fork:
after a SIGHUP, or a ``--reload`` after a file changed, new workers serve the
new code while the Manager, and its state, stay.

What ``runcluster`` hands over travels in one environment variable (JSON):
gunicorn's options, the config file, ``sys.path`` (``manage.py``'s directory
is on it) and the banner's lines.
"""

from __future__ import annotations

import json
import os
import sys

#: The environment variable that carries runcluster's plan to the lean master.
PLAN_ENV = "CLUSTERSHM_MASTER_PLAN"


def exec_master(plan: dict) -> None:
    """Replace this process (same pid) with the lean master serving ``plan``."""
    argv = [sys.executable]
    argv += [f"-W{option}" for option in sys.warnoptions]
    argv += [f"-X{k}" if v is True else f"-X{k}={v}" for k, v in getattr(sys, "_xoptions", {}).items()]
    argv += ["-m", __name__]
    env = dict(os.environ)
    env[PLAN_ENV] = json.dumps(plan)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _banner(lines: list[str], manager) -> list[str]:
    """The banner; with a remote engine, its line says where the state is instead of the Manager's."""
    from . import cluster

    remote = cluster.remote_engine()
    if manager is not None or remote is None:
        return lines
    where = f"No Manager (master pid {{master}}): the state is on the {remote['engine']} engine at {remote['address']}"
    return [where if line.startswith("Manager (cluster mode)") else line for line in lines]


def main() -> int:
    plan = json.loads(os.environ.pop(PLAN_ENV))
    for path in reversed(plan["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)

    from . import cluster
    from .app import ClusterApplication

    cluster.master_logging()
    app = ClusterApplication(plan["options"], plan["config"])
    # This process only serves the Manager and gunicorn's arbiter: the Manager owns its garbage collector.
    manager = cluster.start_manager(own_gc=True)
    try:
        cluster.run_start_up()
    except RuntimeError as exc:
        cluster.stop_manager()
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(
        "\n".join(_banner(plan["banner"], manager)).format(master=os.getpid(), manager=manager and manager.address)
        + "\nThe master holds no project code: SIGHUP (or --reload) serves new code, the state stays.\n"
    )
    sys.stdout.flush()
    try:
        app.run()
    except BaseException:
        if cluster.manager_failed():
            # However the arbiter ended (a worker that failed to boot while the
            # Manager was gone halts it before its on_exit hook runs), a dead
            # Manager is what the exit status says.
            cluster.stop_manager()
            return cluster.EXIT_MANAGER_DIED
        raise
    finally:
        cluster.stop_manager()
    return cluster.EXIT_MANAGER_DIED if cluster.manager_failed() else 0


if __name__ == "__main__":
    sys.exit(main())
