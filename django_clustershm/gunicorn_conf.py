"""A gunicorn config module that runs the Manager in gunicorn's master.

For users who start gunicorn themselves::

    DJANGO_SETTINGS_MODULE=mysite.settings \\
        gunicorn -c python:django_clustershm.gunicorn_conf mysite.wsgi

    # ASGI, with uvicorn's worker (pip install 'django-clustershm[asgi]'):
    DJANGO_SETTINGS_MODULE=mysite.settings \\
        gunicorn -c python:django_clustershm.gunicorn_conf -k uvicorn_worker.UvicornWorker mysite.asgi:application

With a config file of your own, import the hooks into it; if you already
define one of them, call ours from yours (or use :func:`chain`)::

    # gunicorn.conf.py
    from django_clustershm.gunicorn_conf import on_starting, post_fork, post_worker_init, child_exit, on_exit  # noqa: F401

    # or, keeping your own hooks:
    from django_clustershm.gunicorn_conf import chain, on_starting as cs_on_starting

    def my_on_starting(server):
        ...

    on_starting = chain(cs_on_starting, my_on_starting)

``on_starting`` runs before gunicorn loads the application, so with
``--preload`` too, what the app stores at import (or in ``AppConfig.ready()``)
goes to the Manager the workers share. ``post_fork`` ties each worker to the
master (it exits within about a second if the master dies, even by SIGKILL)
and keeps its heartbeat going while it waits for a lock; with
``post_worker_init``, a worker told to stop while it boots exits before it
serves (gunicorn alone loses that signal).
"""

from .serve.cluster import chain, child_exit, on_exit, on_starting, post_fork, post_worker_init

__all__ = ["chain", "child_exit", "on_exit", "on_starting", "post_fork", "post_worker_init"]
