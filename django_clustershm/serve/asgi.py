"""ASGI under ``runcluster``: which worker classes speak ASGI, and which application they get.

gunicorn hands its workers whatever ``Application.load()`` returns, and a
worker class decides which protocol it speaks to it. A sync or gthread worker
calls a WSGI application; uvicorn's worker awaits an ASGI one. ``runcluster``
therefore loads the ASGI application exactly when the worker class is an ASGI
one, by this rule (:func:`is_asgi_worker`):

* a class that says so with a class attribute ``ASGI = True`` (or ``False``);
* otherwise, a subclass of uvicorn's gunicorn workers (``uvicorn_worker``,
  or the deprecated ``uvicorn.workers``) or of gunicorn's own ``asgi`` worker
  (gunicorn 24 and later).

The application is the object named by ``settings.ASGI_APPLICATION`` (a dotted
path, as Django Channels uses it), or else Django's ``get_asgi_application()``.
"""

from __future__ import annotations

from typing import Any

#: What ``runcluster --asgi`` runs: uvicorn's gunicorn worker, from the
#: ``asgi`` extra (the uvicorn-worker package).
UVICORN_WORKER = "uvicorn_worker.UvicornWorker"
INSTALL_HINT = "pip install 'django-clustershm[asgi]'"

#: Modules whose worker classes (and their subclasses) speak ASGI.
ASGI_WORKER_MODULES = ("uvicorn_worker", "uvicorn.workers", "gunicorn.workers.gasgi")


class WorkerClassError(ValueError):
    """A worker class that cannot be loaded, said in one sentence."""


def load_worker_class(uri: Any) -> type:
    """The worker class gunicorn would load for ``uri`` (a name such as
    ``sync``, a dotted path, or a class), without running its ``setup()``."""
    from gunicorn import util

    try:
        return util.load_class(uri)
    except (RuntimeError, AttributeError) as exc:  # gunicorn's RuntimeError holds a whole traceback as text
        name = uri if isinstance(uri, str) else repr(uri)
        hint = f" (uvicorn's worker is in the asgi extra: {INSTALL_HINT})" if name.startswith("uvicorn") else ""
        cause = exc.__context__ if isinstance(exc, RuntimeError) else exc
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        raise WorkerClassError(f"Cannot load the worker class {name!r}{reason}{hint}.") from None


def is_asgi_worker(worker_class: type) -> bool:
    """True if ``worker_class`` serves an ASGI application (the rule above)."""
    declared = getattr(worker_class, "ASGI", None)
    if isinstance(declared, bool):
        return declared
    return any(
        klass.__module__ == module or klass.__module__.startswith(module + ".")
        for klass in worker_class.__mro__
        for module in ASGI_WORKER_MODULES
    )


def uvicorn_worker_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("uvicorn_worker") is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules["uvicorn_worker"] = None
        return False


def application_name() -> str:
    """What :func:`get_asgi_application` loads, in words (for the banner)."""
    from django.conf import settings

    return getattr(settings, "ASGI_APPLICATION", None) or "django.core.asgi.get_asgi_application()"


def get_asgi_application():
    """The project's ASGI application: ``settings.ASGI_APPLICATION`` if set,
    else Django's own (``get_asgi_application()``)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    path = getattr(settings, "ASGI_APPLICATION", None)
    if not path:
        from django.core.asgi import get_asgi_application as django_asgi_application

        return django_asgi_application()
    from django.utils.module_loading import import_string

    try:
        return import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"ASGI_APPLICATION {path!r} could not be loaded: {exc}") from exc
