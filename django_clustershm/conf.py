"""Settings, and which Manager the module-level API talks to.

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
3. otherwise an embedded, in-process Manager (``runserver``, ``shell``, tests).

Settings (all optional), ``CLUSTERSHM = {...}`` in Django settings:

==================  =========================================================
``ADDRESS``          socket path of a running cluster to attach to
``SECRET_FILE``      file holding its secret (default: ``secret`` beside it)
``TIMEOUT``          seconds any call may take (default 5)
``MAX_KEY_SIZE``     bytes of a key in UTF-8 (default 4096)
``MAX_VALUE_SIZE``   bytes of a pickled value (default 32 MiB)
``MAX_STORE_BYTES``  budget of the shared store (default: unbounded)
``NEAR_CACHE``       ``{"MAX_ENTRIES": n, "MAX_BYTES": n}``: a near cache for
                     the store's reads (cluster mode; see :mod:`.near`)
``CLIENT_SPIN``      seconds a call polls for its reply before sleeping
                     (default 20e-6, adaptive; 0: never)
==================  =========================================================
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .client import DEFAULT_SPIN, DEFAULT_TIMEOUT, Client, EmbeddedClient, SocketClient
from .engine import DEFAULT_MAX_KEY, DEFAULT_MAX_VALUE, Limits
from .exceptions import ManagerUnavailable

logger = logging.getLogger("django_clustershm")

DEFAULTS: dict[str, Any] = {
    "ADDRESS": None,
    "SECRET_FILE": None,
    "TIMEOUT": DEFAULT_TIMEOUT,
    "MAX_KEY_SIZE": DEFAULT_MAX_KEY,
    "MAX_VALUE_SIZE": DEFAULT_MAX_VALUE,
    "MAX_STORE_BYTES": None,
    "NEAR_CACHE": None,
    "CLIENT_SPIN": DEFAULT_SPIN,
}

_lock = threading.Lock()
_client: Client | None = None
_cluster: tuple[str, bytes] | None = None


def settings() -> dict[str, Any]:
    """``DEFAULTS`` updated with Django's ``settings.CLUSTERSHM``, if Django is configured."""
    merged = dict(DEFAULTS)
    try:
        from django.conf import settings as dj_settings

        if dj_settings.configured:
            merged.update(getattr(dj_settings, "CLUSTERSHM", {}) or {})
    except ImportError:  # pragma: no cover - Django is a dependency, but the client does not need it
        pass
    return merged


def limits_from_settings(conf: dict[str, Any] | None = None) -> Limits:
    conf = conf or settings()
    return Limits(max_key=int(conf["MAX_KEY_SIZE"]), max_value=int(conf["MAX_VALUE_SIZE"]))


def read_secret(address: str, secret_file: str | None = None) -> bytes:
    path = secret_file or os.path.join(os.path.dirname(address), "secret")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ManagerUnavailable(f"cannot read the cluster secret from {path}: {exc.strerror}") from exc


def connect(address: str, secret: bytes | None = None, *, secret_file: str | None = None, timeout: float | None = None) -> SocketClient:
    """A client of the running Manager at ``address`` (same user, same host)."""
    if secret is None:
        secret = read_secret(address, secret_file)
    return SocketClient(address, secret, timeout=settings()["TIMEOUT"] if timeout is None else timeout)


def configure(address: str | None, secret: bytes | None = None, *, listeners: bool = True) -> None:
    """Point this process (and the processes it forks) at a Manager.

    ``configure(None)`` goes back to choosing from the settings on next use.
    Registered listeners move to the new Manager, unless ``listeners=False``.
    """
    global _client, _cluster
    with _lock:
        _cluster = None if address is None else (address, secret if secret is not None else read_secret(address))
        old, _client = _client, None
    if old is not None:
        old.close()
    if listeners:
        from .listen import _hub

        _hub.client_changed()


def cluster() -> tuple[str, bytes] | None:
    """The (address, secret) this process was configured with, if any."""
    return _cluster


def get_client() -> Client:
    """The process-wide client behind ``django_clustershm.get()`` and friends."""
    client = _client
    if client is None:
        client = _make_client()
    return client


def _make_client() -> Client:
    global _client
    with _lock:
        if _client is not None:
            return _client
        conf = settings()
        timeout = float(conf["TIMEOUT"])
        if _cluster is not None:
            address, secret = _cluster
            _client = SocketClient(address, secret, timeout=timeout, spin=float(conf["CLIENT_SPIN"]))
            logger.info("django-clustershm: cluster mode, Manager at %s", address)
            _near_for_store(_client, conf)
        elif conf["ADDRESS"] or os.environ.get("CLUSTERSHM_ADDRESS"):
            address = conf["ADDRESS"] or os.environ["CLUSTERSHM_ADDRESS"]
            _client = SocketClient(
                address, read_secret(address, conf["SECRET_FILE"]), timeout=timeout, spin=float(conf["CLIENT_SPIN"])
            )
            logger.info("django-clustershm: attached to the Manager at %s", address)
            _near_for_store(_client, conf)
        else:
            max_store = conf["MAX_STORE_BYTES"]
            _client = EmbeddedClient(
                limits=limits_from_settings(conf), max_store_bytes=None if max_store is None else int(max_store)
            )
            logger.info("django-clustershm: embedded mode (in-process Manager; state is not shared between processes)")
        return _client


def near_options(options) -> tuple[int, int] | None:
    """(max_entries, max_bytes) from a NEAR_CACHE setting, or None if off."""
    if not options:
        return None
    return int(options.get("MAX_ENTRIES", 10_000)), int(options.get("MAX_BYTES", 16 * 2**20))


def _near_for_store(client: SocketClient, conf: dict) -> None:
    near = near_options(conf["NEAR_CACHE"])
    if near is not None:
        client.enable_near_cache("", *near)


def _after_fork_in_child() -> None:
    # Another thread may have held the lock when this process was forked.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def reset() -> None:
    """Forget the process-wide client (tests, and after settings change)."""
    configure(None)
