"""``manage.py runcluster``: serve the project with gunicorn, the Manager in its master.

One master process runs gunicorn's arbiter (signals, respawn, timeouts,
graceful reload) and the Manager; the arbiter forks the workers, which
inherit the Manager's address and secret in memory.

WSGI by default; ``--asgi`` (or an ASGI worker class, see
:mod:`django_clustershm.serve.asgi`) serves the project's ASGI application
through uvicorn's gunicorn worker instead.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from django.core.management.base import BaseCommand, CommandError

from django_clustershm.serve import asgi, master

ERRNO_MESSAGES = {  # as Django's runserver words them
    errno.EACCES: "You don't have permission to access that port.",
    errno.EADDRINUSE: "That port is already in use.",
    errno.EADDRNOTAVAIL: "That IP address can't be assigned to.",
}


def default_workers() -> int:
    # gunicorn's advice: (2 x cores) + 1.
    return 2 * (os.cpu_count() or 1) + 1


def parse_bind(value: str) -> tuple:
    """``("unix", path)`` or ``("tcp", host, port)``; CommandError if malformed."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise CommandError(f"'{value}' is not a valid address: give unix:PATH.")
        return ("unix", path)
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"'{value}' is not a valid address: use HOST:PORT, PORT or unix:PATH.")
    return ("tcp", host, int(port))


def check_bind(bind: tuple) -> None:
    """Fail with one sentence now, rather than after gunicorn's five retries."""
    if bind[0] == "unix":
        directory = os.path.dirname(os.path.abspath(bind[1]))
        if not os.path.isdir(directory):
            raise CommandError(f"Cannot bind unix:{bind[1]}: the directory {directory} does not exist.")
        return
    _, host, port = bind
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CommandError(f"Cannot bind {host}:{port}: {exc.strerror}.") from exc
    family, _, _, _, addr = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
    except OSError as exc:
        reason = ERRNO_MESSAGES.get(exc.errno or 0) or exc.strerror
        raise CommandError(f"Cannot bind {host}:{port}: {reason}") from exc
    finally:
        probe.close()


def check_in_child(command: BaseCommand, load_asgi: bool = False) -> None:
    """Run Django's system checks and import the URLconf in a throwaway child
    (and, with ``load_asgi``, load the ASGI application the workers will load).

    A broken app then fails now, in one sentence, while the master keeps no
    project code (views, urls) that a SIGHUP of the workers could not reload.
    """
    r, w = os.pipe()
    # The child only checks and reports through the pipe: no warning from it (its
    # at-fork steps included) about the embedded Manager this process's ready()
    # used, which it inherits and does not serve from.
    log = logging.getLogger("django_clustershm")
    level = log.level
    log.setLevel(logging.ERROR)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            log.setLevel(level)
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        code = 0
        try:
            from django.core.management.base import SystemCheckError
            from django.urls import get_resolver

            try:
                _ = get_resolver().url_patterns  # imports the URLconf and every view module
                if load_asgi:
                    asgi.get_asgi_application()  # ASGI_APPLICATION's module, or Django's handler
            except Exception as exc:
                message = f"The application failed to import: {type(exc).__name__}: {exc}"
            else:
                try:
                    command.check(display_num_errors=False)
                    message = ""
                except SystemCheckError as exc:
                    message = str(exc).strip()
            if message:
                os.write(w, message.encode()[:16000])
                code = 1
        except BaseException as exc:  # any failure is reported to the parent
            os.write(w, f"The application failed to import: {type(exc).__name__}: {exc}".encode()[:16000])
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        message = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise CommandError(message or "The application failed to import: the check process died.")


class Command(BaseCommand):
    help = "Serve this project with several worker processes that share memory through a Manager in the master."

    default_bind = "127.0.0.1:8000"
    # The checks run in a throwaway child (check_in_child), not in the master.
    requires_system_checks: list = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--bind",
            "-b",
            action="append",
            metavar="ADDRESS",
            help=f"HOST:PORT, PORT or unix:PATH; repeatable (default {self.default_bind})",
        )
        parser.add_argument(
            "--workers",
            "-w",
            type=int,
            default=None,
            help=f"worker processes (default 2 x CPUs + 1 = {default_workers()})",
        )
        parser.add_argument("--threads", type=int, default=1, help="threads per worker (more than 1: gthread workers)")
        parser.add_argument(
            "--worker-class",
            default=None,
            help="gunicorn worker class (default: sync, or gthread with --threads); an ASGI one implies --asgi",
        )
        parser.add_argument(
            "--asgi",
            action="store_true",
            help=f"serve the ASGI application with uvicorn's worker ({asgi.UVICORN_WORKER}; {asgi.INSTALL_HINT})",
        )
        parser.add_argument(
            "--timeout", type=int, default=30, help="seconds before a silent worker is killed and replaced"
        )
        parser.add_argument(
            "--graceful-timeout", type=int, default=30, help="seconds workers get to finish on stop or reload"
        )
        parser.add_argument(
            "--max-requests", type=int, default=0, help="restart a worker after this many requests (0: never)"
        )
        parser.add_argument("--max-requests-jitter", type=int, default=0)
        parser.add_argument("--access-log", default=None, metavar="FILE", help="access log file, or - for stdout")
        parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
        parser.add_argument("--reload", action="store_true", help="restart workers when code changes (development)")
        parser.add_argument("--pid", dest="pidfile", default=None, metavar="FILE", help="write the master's pid here")
        parser.add_argument(
            "--config",
            "-c",
            dest="gunicorn_config",
            default=None,
            metavar="FILE",
            help="a gunicorn config file for every other setting (its hooks keep working)",
        )

    def handle(self, *args, **opts):
        binds = opts["bind"] or [self.default_bind]
        parsed = [parse_bind(b) for b in binds]
        workers = opts["workers"] if opts["workers"] is not None else default_workers()
        if workers < 1:
            raise CommandError("--workers must be at least 1.")
        if opts["threads"] < 1:
            raise CommandError("--threads must be at least 1.")
        worker_class = opts["worker_class"]
        if opts["asgi"] and not worker_class:
            if not asgi.uvicorn_worker_available():
                raise CommandError(
                    f"--asgi needs uvicorn's gunicorn worker ({asgi.UVICORN_WORKER}): {asgi.INSTALL_HINT}"
                )
            worker_class = asgi.UVICORN_WORKER
        for bind in parsed:
            check_bind(bind)

        options = {
            "bind": [
                f"unix:{b[1]}" if b[0] == "unix" else f"[{b[1]}]:{b[2]}" if ":" in b[1] else f"{b[1]}:{b[2]}"
                for b in parsed
            ],
            "workers": workers,
            "threads": opts["threads"],
            "timeout": opts["timeout"],
            "graceful_timeout": opts["graceful_timeout"],
            "max_requests": opts["max_requests"],
            "max_requests_jitter": opts["max_requests_jitter"],
            "accesslog": opts["access_log"],
            "errorlog": "-",
            "loglevel": opts["log_level"],
            "reload": opts["reload"],
            "pidfile": opts["pidfile"],
            "proc_name": "runcluster",
        }
        if worker_class:
            options["worker_class"] = worker_class
        from django_clustershm.serve.app import ClusterApplication

        app = ClusterApplication(options, opts["gunicorn_config"])
        try:
            serves_asgi = app.serves_asgi()  # the worker class may come from --config too
        except asgi.WorkerClassError as exc:
            raise CommandError(str(exc)) from None
        if opts["asgi"] and not serves_asgi:
            raise CommandError(f"--asgi: the worker class {app.cfg.worker_class_str!r} is not an ASGI worker class.")
        if serves_asgi and app.cfg.threads > 1:
            raise CommandError(
                "--threads applies to WSGI workers only: an ASGI worker serves many requests at once on its event "
                "loop (Django runs sync views on threads of its own)."
            )
        check_in_child(self, load_asgi=serves_asgi)
        # This process has imported the whole project (manage.py set Django
        # up): become the lean master instead, which holds none of it, so
        # that workers forked after a SIGHUP load the new code (serve/master.py).
        master.exec_master(
            {
                "options": options,
                "config": opts["gunicorn_config"],
                "sys_path": [p for p in sys.path if p],
                "banner": self._banner(app, serves_asgi),
            }
        )

    def _banner(self, app, serves_asgi: bool = False) -> list[str]:
        """The banner's lines; the master fills in its pid and the Manager's address."""
        cfg = app.cfg
        addresses = ", ".join(f"http://{b}/" if not b.startswith("unix:") else b for b in cfg.bind)
        kind = (
            f"{cfg.worker_class_str}, ASGI: {asgi.application_name()}"
            if serves_asgi
            else f"{cfg.worker_class_str}, {cfg.threads} thread(s) each"
        )
        return [
            f"Django {__import__('django').get_version()}, settings {os.environ.get('DJANGO_SETTINGS_MODULE')}",
            f"runcluster: {cfg.workers} workers ({kind}) at {addresses}",
            "Manager (cluster mode) in the master, pid {master}, at {manager}",
            "Quit with CONTROL-C (SIGTERM/SIGINT stop gracefully, SIGHUP reloads the workers' code).",
        ]
