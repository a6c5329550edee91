"""What a running cluster leaves on disk for the other processes of its user.

**Stale socket directories**: a master killed with SIGKILL leaves its
Manager's directory (``<tmp>/clustershm-*``: socket and secret) behind. At
start, :func:`remove_stale_socket_dirs` removes those of dead Managers, by
rules that never touch another user's, a live one, or one being made.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import tempfile
import time

logger = logging.getLogger("django_clustershm")

#: How the Manager names the directory it makes for its socket (server/manager.py).
SOCKET_DIR_PREFIX = "clustershm-"
SOCKET_NAME = "manager.sock"
#: The master's pid, written beside the socket by the cluster's start.
PID_FILE = "pid"
#: What a Manager's directory holds; a directory holding anything else is not one.
SOCKET_DIR_FILES = frozenset({SOCKET_NAME, "secret", PID_FILE})
#: A directory that records no pid is stale only if its socket refuses
#: connections *and* nothing changed in it for this long (a Manager between
#: making the directory and listening must not lose it).
STALE_AGE = 60.0


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


def _private_dir(path: str) -> bool:
    """True if ``path`` is a directory (not a link) of this user that no one else may write."""
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
