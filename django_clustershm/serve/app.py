"""The gunicorn application behind ``runcluster``: Django's WSGI or ASGI app, our hooks."""

from __future__ import annotations

from gunicorn.app.base import Application

from . import asgi, cluster


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
        if self.serves_asgi():
            return asgi.get_asgi_application()
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
