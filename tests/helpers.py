"""Process helpers for the tests: a Manager in its own forked process, and
forked workers whose exit codes are asserted.

Everything here ends only the processes it started, by pid.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import NoReturn


def skip_or_fail(message: str) -> NoReturn:
    """Something a test needs is missing: skip on a developer's machine, fail on CI
    (``CI=true``), which installs everything."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005, message: str = "condition"):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ManagerProcess:
    """A Manager serving in a forked child, as in a cluster master.

    The child logs to ``self.log_path`` so tests can read the reasons it gives
    for closing a connection.
    """

    def __init__(self, *, nofile: int | None = None, collect_on_sigusr2: bool = False, **manager_options) -> None:
        self.nofile = nofile  # a hard limit on the Manager process's open files
        # SIGUSR2 makes the Manager's process run a full garbage collection on
        # its loop's thread (between two bytecodes of a loop round), as one
        # that comes by itself would.
        self.collect_on_sigusr2 = collect_on_sigusr2
        self.dir = tempfile.mkdtemp(prefix="cshm-test-")
        self.address = os.path.join(self.dir, "m.sock")
        self.secret = os.urandom(32)
        self.log_path = os.path.join(self.dir, "manager.log")
        self.options = manager_options
        self.pid: int | None = None

    def start(self) -> ManagerProcess:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve until SIGTERM
            code = 1
            try:
                os.close(r)
                from django_clustershm.server.manager import Manager

                handler = logging.FileHandler(self.log_path)
                log = logging.getLogger("django_clustershm")
                log.handlers[:] = [handler]
                log.setLevel(logging.DEBUG)
                if self.nofile is not None:
                    import resource

                    resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
                manager = Manager(self.address, self.secret, **self.options)
                signal.signal(signal.SIGTERM, lambda *_: manager.close())
                if self.collect_on_sigusr2:
                    import gc

                    signal.signal(signal.SIGUSR2, lambda *_: gc.collect())
                os.write(w, b"1")
                os.close(w)
                manager.serve_forever()
                handler.close()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        try:
            if os.read(r, 1) != b"1":
                raise RuntimeError("the Manager process failed to start")
        finally:
            os.close(r)
        self.pid = pid
        return self

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """SIGTERM and reap; return the exit status (0 for a clean stop)."""
        if self.pid is None:
            return 0
        pid, self.pid = self.pid, None
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        return reap(pid, 10)

    def kill(self) -> None:
        if self.pid is not None:
            pid, self.pid = self.pid, None
            os.kill(pid, signal.SIGKILL)
            reap(pid, 10)
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def reap(pid: int, timeout: float) -> int:
    """waitpid with a deadline; SIGKILL the child (ours) if it overstays."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit within {timeout}s (killed)")
        time.sleep(0.005)


def block_until_killed() -> None:
    """Keep a child (and its connections) alive until the test kills it."""
    while True:
        signal.pause()


def fork_call(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child; return its pid. Exit 0 on success."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def run_forked(n: int, fn, *args, timeout: float = 60) -> list[int]:
    """Run ``fn(i, *args)`` in ``n`` forked children at once; return their exit codes."""
    pids = [fork_call(fn, i, *args) for i in range(n)]
    return [reap(pid, timeout) for pid in pids]


def socket_client(address: str, secret: bytes, **options):
    """A client of the Manager at ``address`` over the socket transport."""
    from django_clustershm.client import Client, SocketTransport

    return Client(SocketTransport(address, secret, **options))


def embedded_client(**engine_options):
    """A client of a fresh in-process engine."""
    from django_clustershm.client import Client, EmbeddedTransport

    return Client(EmbeddedTransport(**engine_options))


def lock_waiters(key: str) -> int:
    """How many requests wait for lock ``key``, on whichever engine the module API uses."""
    import django_clustershm as clustershm

    client = clustershm.get_client()
    transport = client.transport
    if getattr(transport, "name", "") == "redis":
        _base, keys = transport.ops._lock_keys(key)
        return int(transport.redis.execute_command("LLEN", keys[1]))
    for held in client.stats()["locks"]["held"]:
        if held["key"] == key:
            return len(held["waiters"])
    return 0


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): state T in /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def drop_module_client() -> None:
    """End the module-level client (its threads, connections and sessions) and forget it."""
    from django_clustershm import registry

    current = registry.current()
    if current is not None:
        current.shutdown()
        current.transport.shutdown()
    registry.reset()
