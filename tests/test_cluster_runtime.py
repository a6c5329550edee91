"""A cluster's life beside its master (#13 parts 3-5), with real processes where it matters:

* a clean death: a master killed with SIGKILL takes its workers with it within 2 s (sync and
  ASGI), the port is free for a new runcluster, which removes the dead master's socket
  directory and leaves a live Manager's alone;
* lock waits are not hangs: a sync worker waiting for a lock past gunicorn's --timeout is not
  killed, the lock's own timeout decides;
* tools find the running cluster: clustershm_stats and shell attach to it through the runtime
  file; without one they say so on stderr; pytest and imports never attach by themselves.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from django_clustershm import registry, runtime
from django_clustershm.client import transport as transport_module
from django_clustershm.server import Manager

from .helpers import socket_client, wait_until
from .test_runcluster import ROOT, Server, require_uvicorn_worker


@pytest.fixture
def short_tmp():
    """A short private directory under /tmp: the Manager's socket path lives under
    $TMPDIR and must fit in 108 bytes, which pytest's tmp_path does not promise."""
    path = tempfile.mkdtemp(prefix="cs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def isolated_env(short_tmp: str) -> dict:
    """Manager directories and runtime files of the processes started with this
    environment go under ``short_tmp``, away from any real cluster of this user."""
    for name in ("tmp", "run"):
        os.makedirs(os.path.join(short_tmp, name), mode=0o700, exist_ok=True)
    return {"TMPDIR": os.path.join(short_tmp, "tmp"), "XDG_RUNTIME_DIR": os.path.join(short_tmp, "run")}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen(1)
        except OSError:
            return False
    return True


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def manage(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- 3. a clean death -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_workers_exit_within_2s_of_a_sigkilled_master_and_a_restart_cleans_up(tmp_path, short_tmp, kind):
    extra = ["--asgi"] if kind == "asgi" else []
    if extra:
        require_uvicorn_worker()
    env = isolated_env(short_tmp)
    first = Server(tmp_path, *extra, "--workers", "2", env=env, workers=2).start()
    live_dir = os.path.join(env["TMPDIR"], "clustershm-live")
    live = None
    second = None
    try:
        old_dir = os.path.dirname(first.manager_address())
        assert os.path.exists(os.path.join(old_dir, runtime.PID_FILE))
        workers = first.workers()
        # One worker is busy in a 30 s view: the grace is short, whatever a request does.
        busy = threading.Thread(target=lambda: _swallow(first.get, "/slow/?s=30", 40), daemon=True)
        busy.start()
        time.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(first.master, signal.SIGKILL)
        first.proc.wait(5)
        wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10, interval=0.01, message="workers gone")
        exited_after = time.monotonic() - killed_at
        wait_until(lambda: port_is_free(first.port), timeout=10, interval=0.01, message="port free")
        free_after = time.monotonic() - killed_at
        print(
            f"{kind}: {len(workers)} workers exited {exited_after:.2f}s after the master's SIGKILL, port free after {free_after:.2f}s"
        )
        assert exited_after < 2.0 and free_after < 2.0, (exited_after, free_after)
        assert f"the master (pid {first.master}) is gone" in first.log()
        assert os.path.isdir(old_dir)  # left behind by the SIGKILL

        # A live Manager's directory, idle for an hour and naming a dead pid, is left alone: it answers.
        os.mkdir(live_dir, 0o700)
        live = Manager(os.path.join(live_dir, "manager.sock")).start()
        with open(os.path.join(live_dir, runtime.PID_FILE), "w") as fh:
            fh.write(f"{first.master}\n")
        os.utime(live_dir, (time.time() - 3600, time.time() - 3600))

        second = on_port(Server(tmp_path, *extra, "--workers", "2", env=env, workers=2), first.port).start()
        assert second.get("/whoami/")[1]["manager_pid"] == second.master
        assert not os.path.exists(old_dir)
        assert f"removed {old_dir}, left by a Manager that is gone" in second.log()
        assert os.path.exists(os.path.join(live_dir, "manager.sock"))
    finally:
        if second is not None:
            second.stop()
        first.stop()
        if live is not None:
            live.close()


def on_port(server: Server, port: int) -> Server:
    server.port = port
    server.argv[server.argv.index("--bind") + 1] = f"127.0.0.1:{port}"
    return server


def _swallow(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


def test_stale_socket_dirs_are_told_by_rules_that_never_touch_a_live_or_foreign_one(short_tmp):
    base = os.path.join(short_tmp, "tmp")
    os.mkdir(base, 0o700)
    dead_pid = _dead_pid()
    sleeper = subprocess.Popen(["sleep", "30"])
    hour_ago = time.time() - 3600
    live = None

    def make(name: str, *, pid: int | None = None, old: bool = True, extra: str | None = None, mode: int = 0o700):
        path = os.path.join(base, name)
        os.mkdir(path, 0o700)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(path, "manager.sock"))  # bound, never listening: refuses, as a dead one's
        sock.close()
        with open(os.path.join(path, "secret"), "wb") as fh:
            fh.write(b"x" * 32)
        if pid is not None:
            with open(os.path.join(path, runtime.PID_FILE), "w") as fh:
                fh.write(f"{pid}\n")
        if extra:
            open(os.path.join(path, extra), "w").close()
        os.chmod(path, mode)
        if old:
            os.utime(path, (hour_ago, hour_ago))
        return path

    try:
        dead = make("clustershm-dead", pid=dead_pid, old=False, extra="manager.sock.near")  # a dead master's, just now
        old_no_pid = make("clustershm-oldnopid")  # a standalone Manager's, killed an hour ago
        young_no_pid = make("clustershm-young", old=False)  # maybe a Manager being made
        live_pid = make("clustershm-livepid", pid=sleeper.pid)  # its master still runs
        foreign = make("clustershm-foreign", pid=dead_pid, extra="notes.txt")  # not only a Manager's files
        shared = make("clustershm-shared", pid=dead_pid, mode=0o750)  # not private: not one of ours
        os.symlink(dead, os.path.join(base, "clustershm-link"))  # a link is never followed
        listening = os.path.join(base, "clustershm-listening")
        os.mkdir(listening, 0o700)
        live = Manager(os.path.join(listening, "manager.sock")).start()
        with open(os.path.join(listening, runtime.PID_FILE), "w") as fh:
            fh.write(f"{dead_pid}\n")
        os.utime(listening, (hour_ago, hour_ago))
        others = None
        if os.getuid() == 0:  # another user's: only root can make one to test with
            others = make("clustershm-others", pid=dead_pid)
            os.chown(others, 12345, 12345)

        removed = runtime.remove_stale_socket_dirs(base)
        assert sorted(removed) == sorted([dead, old_no_pid])
        for kept in (young_no_pid, live_pid, foreign, shared, listening, *(p for p in [others] if p)):
            assert os.path.isdir(kept), kept
        assert os.path.islink(os.path.join(base, "clustershm-link"))
    finally:
        sleeper.kill()
        sleeper.wait()
        if live is not None:
            live.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 4. lock waits are not hangs --------------------------------------------------------------


@pytest.mark.slow
def test_a_sync_lock_wait_past_gunicorns_timeout_is_not_a_hang(tmp_path):
    """--timeout 2: the test holds two locks for 4.5 s. A sync view waiting with timeout=20 gets
    its lock after ~4.5 s, one with timeout=3 gives up after 3 s (the lock's timeout decides),
    an async view waiting in a sync worker gets its lock too; a view that merely sleeps 4 s is
    still killed as hung."""
    srv = Server(tmp_path)
    srv.argv[srv.argv.index("--timeout") + 1] = "2"
    srv.start()
    holder = socket_client(srv.manager_address(), registry.read_secret(srv.manager_address()), timeout=5)
    try:
        sync_key, async_key = "demo:lock:hb", "demo:alock:hb"
        tokens = [holder.lock_acquire(sync_key, wait=0), holder.lock_acquire(async_key, wait=0)]
        assert all(tokens)
        requests = {
            "gets": "/lock/?key=hb&timeout=20",
            "gives_up": "/lock/?key=hb&timeout=3",
            "async_gets": "/alock/?key=hb&id=hb&timeout=20",
            "sleeps": "/slow/?s=4",
        }
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = {name: pool.submit(_status, srv, path) for name, path in requests.items()}
            time.sleep(4.5)
            holder.lock_release(sync_key, tokens[0][0])
            holder.lock_release(async_key, tokens[1][0])
            answers = {name: f.result(timeout=30) for name, f in futures.items()}
        print({name: (status, body.get("waited")) for name, (status, body) in answers.items()})
        status, body = answers["gets"]
        assert status == 200 and body["acquired"] is True and 4.0 < body["waited"] < 10, answers
        status, body = answers["gives_up"]
        assert status == 200 and body["acquired"] is False and 2.9 < body["waited"] < 4.4, answers
        status, body = answers["async_gets"]
        assert status == 200 and body["state"] == "holding", answers
        assert answers["sleeps"][0] != 200, answers  # a real hang is still a hang
        log = srv.log()
        assert log.count("WORKER TIMEOUT") == 1, log
    finally:
        holder.shutdown()
        holder.close()
        srv.stop()


def _status(srv: Server, path: str) -> tuple[int | None, dict]:
    try:
        return srv.get(path, timeout=30)
    except OSError as exc:
        return None, {"error": repr(exc)}


def test_a_lock_wait_beats_the_heartbeat_and_an_ordinary_call_does_not(manager_process):
    beats: list[float] = []
    holder = socket_client(manager_process.address, manager_process.secret, timeout=5)
    waiter = socket_client(manager_process.address, manager_process.secret, timeout=5)
    try:
        transport_module.set_heartbeat(lambda: beats.append(time.monotonic()), 0.2)
        waiter.set("k", 1)
        waiter.get("k")
        assert beats == []  # ordinary calls give up within TIMEOUT: they never beat
        token, _ = holder.lock_acquire("hb", wait=0)
        started = time.monotonic()
        assert waiter.lock_acquire("hb", wait=1.0) is None  # the Manager's timeout decides
        waited = time.monotonic() - started
        assert 0.9 < waited < 2.0
        # At the start of the wait, then about every 0.2 s of it (a property, not a timing:
        # a busy VM stretches the wait and the count with it).
        assert 3 <= len(beats) <= waited / 0.2 + 3, (waited, beats)
        holder.lock_release("hb", token)
        # A child forked afterwards does not inherit it.
        pid = os.fork()
        if pid == 0:
            os._exit(0 if transport_module.heartbeat() is None else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        transport_module.set_heartbeat(None)
        for c in (holder, waiter):
            c.shutdown()
            c.close()


# -- 5. tools find the running cluster ---------------------------------------------------------


@pytest.mark.slow
def test_clustershm_stats_and_shell_attach_to_the_running_cluster(tmp_path, short_tmp):
    env = isolated_env(short_tmp)
    srv = Server(tmp_path, "--workers", "2", env=env, workers=2).start()
    holder = None
    try:
        for _ in range(3):
            assert srv.get("/hit/")[0] == 200
        assert srv.get("/cached/")[0] == 200  # an entry of the "default" cache
        files = os.listdir(os.path.join(env["XDG_RUNTIME_DIR"], "django-clustershm"))
        assert len(files) == 1
        record = os.path.join(env["XDG_RUNTIME_DIR"], "django-clustershm", files[0])
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
        assert load(record)["pid"] == srv.master
        holder = socket_client(srv.manager_address(), registry.read_secret(srv.manager_address()), timeout=5)
        token, _ = holder.lock_acquire("demo:lock:stats", wait=0)

        out = manage("clustershm_stats", env=env)
        assert out.returncode == 0, out.stderr
        assert "no running cluster found" not in out.stderr
        text = out.stdout
        assert f"Manager pid {srv.master}," in text, text
        assert re.search(r"^caches: 1\n  default: [1-9]\d* keys?,", text, re.M), text  # /cached/'s entries
        assert "locks: 1 held" in text and "demo:lock:stats: pid" in text, text
        assert "listeners: " in text and f"  pid {sorted(srv.workers())[0]}: 1 subscription\n" in text, text
        stats = json.loads(manage("clustershm_stats", "--json", env=env).stdout)
        assert stats["manager_pid"] == srv.master and stats["store"]["keys"] >= 2

        shell = manage("shell", "-c", "import django_clustershm as c; print('hits', c.get('demo:hits'))", env=env)
        assert shell.returncode == 0, shell.stderr
        assert "hits 3" in shell.stdout, shell.stdout + shell.stderr

        holder.lock_release("demo:lock:stats", token)
        srv.signal(signal.SIGTERM)
        assert srv.wait(30) == 0
        assert not os.path.exists(record)  # a clean stop forgets it
        out = manage("clustershm_stats", env=env)
        assert registry.NO_CLUSTER in out.stderr
    finally:
        if holder is not None:
            holder.shutdown()
            holder.close()
        srv.stop()


def test_without_a_cluster_a_management_command_says_so_on_stderr(short_tmp):
    out = manage("clustershm_stats", env=isolated_env(short_tmp))
    assert out.returncode == 0, out.stderr
    assert registry.NO_CLUSTER in out.stderr
    assert "store: " in out.stdout


@pytest.fixture
def recorded(manager_process, short_tmp, monkeypatch):
    """A runtime file for this project naming a live Manager (with this process as its
    "master"), in a place of the test's own: the environment it returns points there."""
    env = isolated_env(short_tmp)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    secret_file = os.path.join(manager_process.dir, "secret")
    with open(secret_file, "wb") as fh:
        fh.write(manager_process.secret)
    path = runtime.record(manager_process.address, secret_file)
    assert path is not None and path.startswith(env["XDG_RUNTIME_DIR"])
    registry.reset()
    yield env
    runtime.forget()
    monkeypatch.undo()
    tempfile.tempdir = None


def test_pytest_and_imports_never_attach_by_surprise(recorded, manager_process):
    """This very process has a live cluster recorded for its project, yet it is a test
    suite, not a tool run from the command line: it stays embedded, and says nothing."""
    from django.core.management import call_command

    assert runtime.find_running()["address"] == manager_process.address
    assert runtime.management_command() is None
    assert registry.get_client().transport.name == "embedded"
    assert registry.mode() == "embedded"
    out, err = io.StringIO(), io.StringIO()
    call_command("clustershm_stats", stdout=out, stderr=err)  # call_command() is not the command line either
    assert f"Manager pid {os.getpid()}," in out.getvalue()  # this process's own embedded Manager
    assert registry.NO_CLUSTER in err.getvalue()


def test_a_management_command_from_the_command_line_attaches(recorded, manager_process):
    out = manage("clustershm_stats", "--json", env=recorded)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["manager_pid"] == manager_process.pid
    assert registry.NO_CLUSTER not in out.stderr


@pytest.mark.parametrize(
    ("command", "setting", "attaches"),
    [("shell", True, True), ("clustershm_stats", True, True), ("shell", False, False)]
    + [(name, True, False) for name in sorted(registry.NEVER_ATTACH)],
)
def test_which_commands_attach(monkeypatch, settings, command, setting, attaches):
    settings.CLUSTERSHM = {"AUTO_ATTACH": setting}
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "management_command", lambda: command)
        assert registry.auto_attaches() is attaches


def test_a_runtime_file_others_could_write_or_a_dead_masters_is_not_trusted(recorded):
    path = runtime._recorded
    assert path is not None
    os.chmod(path, 0o620)
    assert runtime.find_running() is None  # group-writable: ignored
    os.chmod(path, 0o600)
    assert runtime.find_running() is not None
    data = load(path)
    data["pid"] = _dead_pid()
    with open(path, "w") as fh:
        json.dump(data, fh)
    assert runtime.find_running() is None
    assert not os.path.exists(path)  # a dead master's file is removed by its reader
