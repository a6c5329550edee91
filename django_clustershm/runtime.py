"""What a running cluster leaves on disk for the other processes of its user.

**The runtime file**, so that tools find the running cluster. The master
(``runcluster``, or gunicorn with the config module) records where its
Manager listens in a file of its user's, one per project::

    $XDG_RUNTIME_DIR/django-clustershm/<key>.json      (or, without XDG_RUNTIME_DIR,
    <tmp>/django-clustershm-<uid>/<key>.json           <tmp> being /tmp or $TMPDIR)

``<key>`` is a hash of the project's ``BASE_DIR`` (of its settings module if
it has none). The file (0600, in a 0700 directory) holds the socket's
address, the secret file's path and the master's pid; the secret itself
stays in the Manager's own 0700 directory. It is written atomically at
start and removed on a clean stop; one left by a master that was killed is
recognised by its dead pid, and removed by the next reader. A reader looks
in both places (a server under systemd often has no XDG_RUNTIME_DIR while its
operator's shell has one) and trusts a file only if it is a regular file of
its own user that no one else may write.

**Stale socket directories**: a master killed with SIGKILL leaves its
Manager's directory (``<tmp>/clustershm-*``: socket and secret) behind. At
start, :func:`remove_stale_socket_dirs` removes those of dead Managers, by
rules that never touch another user's, a live one, or one being made.

**Which processes attach by themselves** (:func:`management_command`): only
a management command run from the command line, never an import, a test
suite or a server; :mod:`.registry` applies the rule.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from typing import Any

from .wire.frames import STAMPS_SUFFIX

logger = logging.getLogger("django_clustershm")

#: How the Manager names the directory it makes for its socket (server/manager.py).
SOCKET_DIR_PREFIX = "clustershm-"
SOCKET_NAME = "manager.sock"
#: The master's pid, written beside the socket by the cluster's start.
PID_FILE = "pid"
#: What a Manager's directory holds; a directory holding anything else is not one.
SOCKET_DIR_FILES = frozenset({SOCKET_NAME, "secret", PID_FILE, SOCKET_NAME + STAMPS_SUFFIX})
#: A directory that records no pid is stale only if its socket refuses
#: connections *and* nothing changed in it for this long (a Manager between
#: making the directory and listening must not lose it).
STALE_AGE = 60.0
FORMAT_VERSION = 1

_recorded: str | None = None


# -- helpers --------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process of this user (a pid now held by
    another user's process is not the one that recorded it; a zombie, which
    a container's init may never reap, is dead)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return True  # cannot tell: assume alive, never remove on a doubt
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: kill() said it exists


def _refuses(address: str) -> bool:
    """True if nothing listens on the Unix socket ``address`` (a live
    Manager accepts; a dead one's socket file refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # busy, or not ours to probe: not provably dead
    finally:
        probe.close()
    return False


def _private_dir(path: str, create: bool = False) -> bool:
    """True if ``path`` is a directory (not a link) of this user that no one
    else may write; with ``create``, make it 0700 first if it is missing."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


# -- stale socket directories ---------------------------------------------------


def mark_socket_dir(address: str) -> None:
    """Record this (master) process's pid beside the Manager's socket, in a
    0600 file, so that a later start can tell the directory is stale once
    this process is dead. Only in a directory the Manager made for itself."""
    directory = os.path.dirname(address)
    if not os.path.basename(directory).startswith(SOCKET_DIR_PREFIX) or not _private_dir(directory):
        return
    try:
        fd = os.open(os.path.join(directory, PID_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")


def _recorded_pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, PID_FILE), "rb") as fh:
            return int(fh.read(32).strip())
    except (OSError, ValueError):
        return None


def is_stale_socket_dir(path: str, now: float | None = None) -> bool:
    """True if ``path`` is the socket directory of a dead Manager of this user.

    All of: a directory (not a link) of this user, 0700, holding nothing but
    a Manager's files; its socket, if there, refuses connections; and the pid
    recorded there is dead, or (no pid recorded: a Manager not started by a
    cluster) nothing changed in it for :data:`STALE_AGE` seconds.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return False
        names = set(os.listdir(path))
        if not names <= SOCKET_DIR_FILES:
            return False
        if SOCKET_NAME in names:
            sock = os.path.join(path, SOCKET_NAME)
            if not stat.S_ISSOCK(os.lstat(sock).st_mode) or not _refuses(sock):
                return False
    except OSError:
        return False
    pid = _recorded_pid(path)
    if pid is not None:
        return pid != os.getpid() and not _alive(pid)
    return (time.time() if now is None else now) - st.st_mtime > STALE_AGE


def remove_stale_socket_dirs(tmpdir: str | None = None) -> list[str]:
    """Remove the socket directories of dead Managers of this user in
    ``tmpdir`` (where the Manager makes them: the temporary directory);
    return the paths removed."""
    base = tmpdir or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(SOCKET_DIR_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(base, name)
        if is_stale_socket_dir(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
                logger.info("django-clustershm: removed %s, left by a Manager that is gone", path)
    return removed


# -- the runtime file -------------------------------------------------------------


def runtime_dirs() -> list[str]:
    """Where runtime files are, in the order they are looked for (the first
    usable one is written)."""
    dirs = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        dirs.append(os.path.join(xdg, "django-clustershm"))
    dirs.append(os.path.join(tempfile.gettempdir(), f"django-clustershm-{os.getuid()}"))
    return dirs


def project_key() -> str | None:
    """This project's name among the user's runtime files: a hash of
    ``settings.BASE_DIR`` (resolved), or of the settings module without one;
    None if Django is not configured."""
    try:
        from django.conf import settings

        if not settings.configured:
            return None
        base = getattr(settings, "BASE_DIR", None)
        identity = os.path.realpath(os.fspath(base)) if base else getattr(settings, "SETTINGS_MODULE", None)
    except Exception:  # ImproperlyConfigured and the like: no project to name
        return None
    if not identity:
        return None
    return hashlib.sha256(str(identity).encode()).hexdigest()[:16]


def _read(path: str) -> dict[str, Any] | None:
    """A runtime file's content, if it is a private file of this user and well formed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            logger.warning("django-clustershm: ignoring %s: %s", path, exc.strerror)
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            logger.warning("django-clustershm: ignoring %s: not a file of this user that only it may read", path)
            return None
        raw = fh.read(64 * 1024)
    try:
        data = json.loads(raw)
        if (
            data.get("version") == FORMAT_VERSION
            and isinstance(data.get("address"), str)
            and isinstance(data.get("pid"), int)
            and isinstance(data.get("secret_file"), (str, type(None)))
        ):
            data["path"] = path
            return data
    except (ValueError, AttributeError):
        pass
    logger.warning("django-clustershm: ignoring %s: not a runtime file of this version", path)
    return None


def _live(data: dict[str, Any]) -> bool:
    """Whether the master a runtime file names is alive and its Manager listens."""
    return _alive(data["pid"]) and not _refuses(data["address"])


def record(address: str, secret_file: str | None, key: str | None = None) -> str | None:
    """Record this master's Manager as the project's running cluster; the
    file's path, or None if there is no project or no private place for it.
    ``key``: the project's (:func:`project_key`), when this process has not
    loaded the settings (runcluster's lean master reads them in a child)."""
    global _recorded
    if key is None:
        key = project_key()
    if key is None:
        return None
    directory = next((d for d in runtime_dirs() if _private_dir(d, create=True)), None)
    if directory is None:
        logger.warning(
            "django-clustershm: no private directory for the runtime file (tried %s): "
            "tools will not find this cluster by themselves",
            ", ".join(runtime_dirs()),
        )
        return None
    path = os.path.join(directory, f"{key}.json")
    previous = _read(path)
    if previous is not None and previous["pid"] != os.getpid() and _live(previous):
        logger.warning(
            "django-clustershm: another cluster of this project is running (master pid %d, Manager at %s); "
            "tools now attach to this one",
            previous["pid"],
            previous["address"],
        )
    data = {
        "version": FORMAT_VERSION,
        "address": address,
        "secret_file": secret_file,
        "pid": os.getpid(),
        "started": time.time(),
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")  # 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _recorded = path
    return path


def forget() -> None:
    """Remove the runtime file this process recorded, if it still names it."""
    global _recorded
    path, _recorded = _recorded, None
    if path is None:
        return
    data = _read(path)
    if data is not None and data["pid"] == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def find_running() -> dict[str, Any] | None:
    """The project's running cluster as its runtime file records it
    (``address``, ``secret_file``, ``pid``, ``path``), or None. A file left by
    a dead master is removed on the way."""
    key = project_key()
    if key is None:
        return None
    for directory in runtime_dirs():
        if not _private_dir(directory):
            continue
        path = os.path.join(directory, f"{key}.json")
        data = _read(path)
        if data is None:
            continue
        if _live(data):
            return data
        again = _read(path)  # unless a new master recorded itself meanwhile
        if again is not None and again["pid"] == data["pid"] and again["address"] == data["address"]:
            try:
                os.unlink(path)
                logger.info("django-clustershm: removed %s, left by a master (pid %d) that is gone", path, data["pid"])
            except OSError:
                pass
    return None


# -- who attaches by itself ---------------------------------------------------------


def _current_frames() -> dict:
    """``sys._current_frames()`` with the garbage collector off: on CPython before
    3.12 it holds the interpreter's thread-list lock while it builds its dict, and
    a collection run then (by a finalizer that needs the same lock) deadlocks the
    process (CPython gh-106883; seen here: a thread's first get_client() hung a
    test run)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        if enabled:
            gc.enable()


def management_command() -> str | None:
    """The name of the management command this process runs from its command
    line (``manage.py NAME``, ``django-admin NAME``), or None: an import, a
    test suite (pytest), ``call_command()`` from other code, a server.

    Told by Django's own ``ManagementUtility.execute`` being on the stack (of
    this thread, else of the main thread), which is where ``manage.py`` runs
    the command and, before it, ``django.setup()`` and every ``ready()``.
    """
    management = sys.modules.get("django.core.management")
    utility_class = getattr(management, "ManagementUtility", None)
    if utility_class is None:
        return None
    code = utility_class.execute.__code__
    stacks = [sys._getframe()]
    if threading.current_thread() is not threading.main_thread():
        main = _current_frames().get(threading.main_thread().ident or 0)
        if main is not None:
            stacks.append(main)
    for frame in stacks:
        f: Any = frame
        while f is not None:
            if f.f_code is code:
                argv = getattr(f.f_locals.get("self"), "argv", None) or []
                return str(argv[1]) if len(argv) > 1 else "help"
            f = f.f_back
    return None
