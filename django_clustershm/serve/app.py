"""The gunicorn application behind ``runcluster``: Django's WSGI or ASGI app, our hooks."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gunicorn.app.base import Application

from . import asgi, cluster

#: What gunicorn's worker answers by raising SystemExit wherever it stands (handle_quit).
QUIT_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


@contextmanager
def quit_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGQUIT back while the block runs, then deliver them.

    gunicorn's worker answers them with ``sys.exit(0)`` wherever it stands; in
    the middle of importing the project (a Ctrl-C while workers boot), that
    SystemExit can land inside a class body's ``__set_name__``, which turns it
    into a RuntimeError: the worker then "failed to boot" and the master halts
    with exit status 3 and a traceback, instead of stopping cleanly. Held back,
    the signal is raised again once the app is loaded, where its SystemExit
    ends the worker with status 0. Only the Python-level handlers change (a
    thread mask would not do: the other threads would still take the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in QUIT_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


class ClusterApplication(Application):
    """gunicorn's ``Application``, configured from ``runcluster``'s options
    (and an optional gunicorn config file), with the Manager's hooks chained in
    front of any hooks that file defines."""

    def __init__(self, options: dict, config_file: str | None = None) -> None:
        self._options = options
        self._config_file = config_file
        super().__init__()

    def init(self, parser, opts, args):  # unused: no command line of gunicorn's own
        return None

    def load_config(self) -> None:
        if self._config_file:
            self.load_config_from_file(self._config_file)
        for key, value in self._options.items():
            if value is not None:
                self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings and not self._config_file:
            # gunicorn 27's control socket defaults to one fixed path in $HOME,
            # which two servers on one host would fight over; runcluster's
            # CLI does not use it (a --config file can turn it back on).
            self.cfg.set("control_socket_disable", True)
        for name, ours in cluster.HOOKS.items():
            self.cfg.set(name, cluster.chain(ours, self.cfg.settings[name].get()))

    def serves_asgi(self) -> bool:
        """True if the configured worker class speaks ASGI (:func:`.asgi.is_asgi_worker`);
        :class:`.asgi.WorkerClassError` if it cannot be loaded."""
        return asgi.is_asgi_worker(asgi.load_worker_class(self.cfg.settings["worker_class"].get()))

    def load(self):
        # In each worker, after the fork (and again after a SIGHUP, which may
        # have changed the worker class through a --config file).
        with quit_signals_deferred():
            if self.serves_asgi():
                return asgi.get_asgi_application()
            from django.core.wsgi import get_wsgi_application

            return get_wsgi_application()
