"""Snapshots against ``runcluster``, with real processes over HTTP (#13): a
restart keeps logins, counters and running TTLs; a SIGKILLed master comes
back from its last periodic snapshot; a bad file (truncated, corrupt, too
permissive, someone else's) says so in one sentence and starts empty, or
stops the start with exit status 78 when ON_ERROR is "refuse".

The engine, the file format and the forked writer on their own: tests/test_snapshot.py.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import stat
import sys
import time

import pytest

import django_clustershm as clustershm
from django_clustershm.server import Engine
from django_clustershm.server import snapshot as S

from .helpers import wait_until
from .test_runcluster import Server, request_with_session

pytestmark = pytest.mark.slow


class SnapshotServer(Server):
    """runcluster serving testproject with CLUSTERSHM["SNAPSHOT"] = ``config``, two workers."""

    def __init__(self, tmp_path, config: dict, workers: int = 2) -> None:
        env = {"DJANGO_SETTINGS_MODULE": "tests.settings_snapshot", "CLUSTERSHM_TEST_SNAPSHOT": json.dumps(config)}
        super().__init__(tmp_path, env=env, workers=workers)
        self.argv = [
            sys.executable, "manage.py", "runcluster", "--workers", str(workers),
            "--bind", f"127.0.0.1:{self.port}", "--timeout", "5", "--graceful-timeout", "5",
        ]  # fmt: skip

    def client(self):
        return clustershm.connect(self.manager_address())

    def stop_gracefully(self) -> None:
        self.signal(signal.SIGTERM)
        assert self.wait() == 0, self.log()


@pytest.fixture
def servers():
    """Every server a test starts, stopped at its end whatever happened."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list, tmp_path, config: dict, wait: bool = True) -> SnapshotServer:
    server = SnapshotServer(tmp_path, config)
    servers.append(server)
    return server.start(wait=wait)


def test_a_restart_keeps_logins_counters_and_running_ttls(tmp_path, servers):
    path = tmp_path / "state.snap"
    config = {"PATH": str(path)}
    first = start(servers, tmp_path, config)
    assert "no snapshot at" in first.log()
    body, cookie = request_with_session(first, "/login/?name=tom", None)
    assert body["user"] == "tom" and cookie
    for _ in range(5):
        first.get("/hit/")
    client = first.client()
    client.set("short", "soon gone", timeout=12)
    set_at = time.time()
    client.set("kept", "for good")
    client.close()
    first.stop_gracefully()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "snapshot of" in first.log() and f"written to {path}" in first.log()

    second = start(servers, tmp_path, config)
    assert "restored" in second.log() and f"from {path}" in second.log()
    assert request_with_session(second, "/me/", cookie)[0]["user"] == "tom"  # still logged in
    assert second.get("/hit/")[1]["hits"] == 6  # the counter went on
    client = second.client()
    try:
        assert client.get("kept") == "for good"
        assert time.time() < set_at + 11, "the restart took too long to see the short key alive"
        assert client.get("short") == "soon gone"
        wait_until(lambda: client.get("short") is None, timeout=20, interval=0.02, message="the short key to expire")
        gone_at = time.time()
    finally:
        client.close()
    # It expired when it would have without the restart: its ttl kept running.
    assert set_at + 12 - 0.1 <= gone_at <= set_at + 12 + 1.0, gone_at - set_at


def test_a_sigkilled_server_restarts_from_its_last_periodic_snapshot(tmp_path, servers):
    path = tmp_path / "state.snap"
    config = {"PATH": str(path), "INTERVAL": 1}
    first = start(servers, tmp_path, config)
    _, cookie = request_with_session(first, "/login/?name=ann", None)
    for _ in range(3):
        first.get("/hit/")
    done = time.time()
    client = first.client()
    try:
        wait_until(
            lambda: ((client.stats()["snapshot"] or {}).get("last") or {}).get("at", 0) > done,
            timeout=15,
            interval=0.1,
            message="a periodic snapshot after the hits",
        )
    finally:
        client.close()
    socket_dir = os.path.dirname(first.manager_address())
    os.killpg(first.master, signal.SIGKILL)  # the master and its workers: no graceful anything
    first.wait()
    shutil.rmtree(socket_dir, ignore_errors=True)  # what a SIGKILLed master leaves behind

    second = start(servers, tmp_path, config)
    assert request_with_session(second, "/me/", cookie)[0]["user"] == "ann"
    assert second.get("/hit/")[1]["hits"] == 4


def good_snapshot(path) -> None:
    """A valid snapshot in which the demo's hit counter is at 41."""
    engine = Engine()
    engine.store.set("demo:hits", 41)
    S.write(engine, str(path))


def spoil(path, how: str) -> str:
    """Make the snapshot at ``path`` bad in one way; the words the server must say."""
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) - 10)
        return "is truncated"
    if how == "corrupt":
        with open(path, "r+b") as fh:
            fh.seek(30)
            byte = fh.read(1)
            fh.seek(30)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return "is corrupt (its checksum does not match)"
    if how == "too permissive":
        os.chmod(path, 0o664)
        return "is writable by its group or by others (mode 0664)"
    if how == "someone else's":
        os.chown(path, 65534, 65534)
        return f"is owned by uid 65534, not by this server's uid {os.geteuid()}"
    raise AssertionError(how)


BAD = [
    "truncated",
    "corrupt",
    "too permissive",
    pytest.param(
        "someone else's", marks=pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another uid needs root")
    ),
]


@pytest.mark.parametrize("how", BAD)
def test_a_bad_snapshot_says_why_and_starts_empty_by_default(tmp_path, servers, how):
    path = tmp_path / "state.snap"
    good_snapshot(path)
    words = spoil(path, how)
    server = start(servers, tmp_path, {"PATH": str(path)})
    log = server.log()
    (line,) = [line for line in log.splitlines() if words in line]
    assert "; starting empty (it was moved to " in line and "Traceback" not in log
    assert server.get("/hit/")[1]["hits"] == 1  # empty: 41 was not restored
    assert not path.exists() and len(glob.glob(f"{path}.bad-*")) == 1  # kept for the operator
    server.stop_gracefully()
    if how == "truncated":  # and the next start is a normal one: no crash loop
        again = start(servers, tmp_path, {"PATH": str(path)})
        assert again.get("/hit/")[1]["hits"] == 2


@pytest.mark.parametrize("how", ["corrupt", *BAD[2:]])
def test_a_bad_snapshot_with_refuse_stops_the_start_with_one_sentence(tmp_path, servers, how):
    path = tmp_path / "state.snap"
    good_snapshot(path)
    words = spoil(path, how)
    server = start(servers, tmp_path, {"PATH": str(path), "ON_ERROR": "refuse"}, wait=False)
    assert server.wait(30) == S.EXIT_REFUSED
    log = server.log()
    (line,) = [line for line in log.splitlines() if words in line]
    assert line.endswith('; not starting (CLUSTERSHM["SNAPSHOT"]["ON_ERROR"] is "refuse")')
    assert "Traceback" not in log and path.exists()  # left where it is
