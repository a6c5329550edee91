"""``manage.py clustershm_stats`` (#18 part 4): caches, locks and listeners in its text,
checked against a live ``runcluster`` and against the Redis engine; ``--watch``
redraws in place on a terminal, prints frames one after another elsewhere, and
Ctrl-C ends it with status 0."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from io import StringIO

import pytest
from django.core.cache import caches
from django.core.management import call_command

import django_clustershm as clustershm
from django_clustershm import registry
from django_clustershm.management.commands.clustershm_stats import CLEAR

from .conftest import _shut_remote, remote_engine
from .helpers import socket_client, wait_until
from .test_cluster_runtime import isolated_env, manage
from .test_runcluster import ROOT, Server


@pytest.fixture
def short_tmp():
    """A short private directory under /tmp (the Manager's socket path must fit in 108 bytes)."""
    path = tempfile.mkdtemp(prefix="cs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _section(text: str, title: str) -> list[str]:
    """The indented lines under ``title:``'s line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title + ":"))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


@pytest.mark.slow
def test_the_text_shows_the_caches_locks_listeners_and_workers_of_a_live_cluster(tmp_path, short_tmp):
    env = isolated_env(short_tmp)
    srv = Server(tmp_path, "--workers", "2", env=env, workers=2).start()
    holder = waiter = thread = None
    try:
        assert srv.get("/cached/")[0] == 200  # entries of the "default" cache
        assert srv.get("/login/?name=ann")[0] == 200  # a session in the "sessions" cache
        address = srv.manager_address()
        secret = registry.read_secret(address)
        holder = socket_client(address, secret, timeout=5)
        waiter = socket_client(address, secret, timeout=5)
        token, fence = holder.lock_acquire("stats:held", wait=0, lease=60)
        waited: list = []

        def wait_then_release():
            got = waiter.lock_acquire("stats:held", wait=30)
            waited.append(got)
            if got is not None:
                waiter.lock_release("stats:held", got[0])  # a lock is its connection's: this thread's

        thread = threading.Thread(target=wait_then_release)
        thread.start()

        def queued():
            held = [h for h in holder.stats()["locks"]["held"] if h["key"] == "stats:held"]
            return held and held[0]["waiters"]

        wait_until(queued, timeout=10, message="a waiter in the lock's queue")
        workers = srv.workers()

        out = manage("clustershm_stats", env=env)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        stats = json.loads(manage("clustershm_stats", "--json", env=env).stdout)

        assert text.startswith(f"local engine: Manager pid {srv.master}, up "), text
        # Workers counted as processes, not connections; the master is none of them.
        match = re.search(
            r"^processes: (\d+) process(?:es)? connected \(pids ([\d, ]+)\), (\d+) connections", text, re.M
        )
        assert match, text
        pids = {int(p) for p in match.group(2).split(", ")}
        assert srv.master not in pids
        assert pids == workers | {os.getpid()}, (pids, workers)  # the workers, and this test's two clients
        assert int(match.group(1)) == len(pids)

        # Caches: the same figures as the Manager's.
        assert stats["caches"].keys() == {"default", "sessions"}
        lines = _section(text, "caches")
        assert len(lines) == 2, text
        for line, (name, c) in zip(lines, sorted(stats["caches"].items()), strict=True):
            assert line.startswith(f"{name}: {c['keys']} key"), (line, c)
            assert c["keys"] >= 1
            assert f"{c['evictions']} evictions" in line, (line, c)
        assert "sessions: 1 key," in text, text

        # Locks: the key, its holder (this process), its fence and its queue.
        assert "locks: 1 held, 1 waiting" in text, text
        (lock_line,) = [line for line in _section(text, "locks") if line.startswith("stats:held:")]
        assert f"pid {os.getpid()}, fence {fence}," in lock_line, lock_line
        assert re.search(r"lease left (5\d|60)\.\ds", lock_line), lock_line
        assert lock_line.endswith(f"waiting pids: {os.getpid()}"), lock_line

        # Listeners: the demo's feature-flag listener, once in each worker, and in the
        # command's own process (manage.py ran the demo's ready() there too).
        match = re.search(r"\(this command's included, pid (\d+)\)", text)
        assert match, text
        command_pid = int(match.group(1))
        assert "listeners: 3 subscriptions in 3 processes" in text, text
        expected = sorted(f"pid {pid}: 1 subscription" for pid in (*workers, command_pid))
        assert sorted(_section(text, "listeners")) == expected, text
        assert {pid: n for pid, n in stats["listeners"]["by_pid"].items() if int(pid) in workers} == {
            str(pid): 1 for pid in workers
        }

        # --watch without a terminal: frames one after another, no escape codes.
        out = manage("clustershm_stats", "--watch", "0.05", "--iterations", "3", env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("--- clustershm_stats --watch 0.05s: ") == 3, out.stdout
        assert out.stdout.count(f"local engine: Manager pid {srv.master},") == 3
        assert "\x1b" not in out.stdout

        holder.lock_release("stats:held", token)
        thread.join(10)
        assert waited and waited[0] is not None
    finally:
        for c in (holder, waiter):
            if c is not None:
                c.shutdown()
                c.close()
        if thread is not None:
            thread.join(30)  # the holder's close freed the lock, or the server's stop ends the wait
        srv.stop()


def _command(*args: str, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "clustershm_stats", *args],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own group: our Ctrl-C goes to it alone
        **popen,
    )


def test_watch_redraws_in_place_on_a_terminal(short_tmp):
    primary, secondary = pty.openpty()
    try:
        proc = _command("--watch", "0.05", "--iterations", "2", env=isolated_env(short_tmp), stdout=secondary)
    finally:
        os.close(secondary)
    output = b""
    try:
        while True:  # read until the command closes its end (EIO on Linux)
            ready, _, _ = select.select([primary], [], [], 30)
            assert ready, output
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(30) == 0
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode()
    assert text.count(CLEAR) == 2, text
    assert text.count("store: 0 keys") == 2, text


def test_ctrl_c_ends_a_watch_with_status_0(tmp_path, short_tmp):
    log = tmp_path / "watch.out"
    with open(log, "wb") as fh:
        proc = _command("--watch", "0.05", env=isolated_env(short_tmp), stdout=fh, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log.read_text().count("--- clustershm_stats") >= 2, timeout=30, message="two frames")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err


def test_watch_refuses_a_bad_interval():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="greater than 0"):
        call_command("clustershm_stats", "--watch", "0", stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError, match="greater than 0"):
        call_command("clustershm_stats", "--watch", "1", "--iterations", "0", stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("where", ["redis", "redis-cluster"])
def test_the_redis_engine_shows_its_caches_and_listened_namespaces(request, settings, where):
    engine = remote_engine(request, where)
    settings.CLUSTERSHM = engine.setting
    backend = "django_clustershm.cache.ClusterShmCache"
    settings.CACHES = {name: {"BACKEND": backend, "LOCATION": name} for name in ("default", "sessions")}
    registry.reset()
    handle = None
    try:
        clustershm.set("a", 1)
        default, sessions = caches["default"], caches["sessions"]
        default.set_many({"x": 1, "y": 2, "z": 3})
        sessions.set("s", {"user": "ann"})
        handle = clustershm.listen(prefix="flags:", callback=lambda *event: None)
        with clustershm.mutex("held-now"):
            out = StringIO()
            call_command("clustershm_stats", stdout=out, stderr=StringIO())
        text = out.getvalue()
        assert text.startswith("redis (") and " engine at " in text, text
        assert "store: 1 key\n" in text, text
        assert _section(text, "caches") == ["default: 3 keys", "sessions: 1 key"], text
        assert "locks: 1 held, 0 waiting" in text and _section(text, "locks") == ["held-now"], text
        assert "listeners: 1 namespace listened to" in text and _section(text, "listeners") == ["(store)"], text
        stats = json.loads(_json())
        assert stats["caches"] == {"default": {"keys": 3}, "sessions": {"keys": 1}}
    finally:
        if handle is not None:
            handle.cancel()
        _shut_remote()


def _json() -> str:
    out = StringIO()
    call_command("clustershm_stats", "--json", stdout=out, stderr=StringIO())
    return out.getvalue()
