"""Helpers shared by the benchmark scripts in this directory (not a benchmark itself).

The scripts run as ``python bench/bench_x.py`` from the repository root, so
this directory is on ``sys.path`` and they import this module as ``_common``.
It does not import django_clustershm at module level: the scripts put the
repository root on ``sys.path`` first when needed.

What is here: forking a child and reaping it by pid (SIGTERM, then SIGKILL if
it lingers), the Manager child and its readiness pipe, redis-server on a Unix
socket in a private temporary directory, the interleaved latency timing with
the garbage collector paused, nearest-rank percentiles and the JSON report.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REAP_TIMEOUT = 10.0  # seconds a child may take to exit before it is SIGKILLed


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the Markdown report."""
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot go on (a server that does not start, a child that failed)."""


# -- forked children ---------------------------------------------------------------


def fork(body, *args, child_signals: bool = False) -> int:
    """Fork a child that runs ``body(*args)`` and leaves with os._exit (0 on success, 1 on an exception).

    With ``child_signals`` the child ignores SIGINT (Ctrl-C goes to the parent,
    which cleans up) and restores the default SIGTERM before ``body`` runs.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if child_signals:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            body(*args)
            status = 0
        except BaseException:
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:
                pass
        finally:
            os._exit(status)
    return pid


def reap(pid: int, timeout: float = REAP_TIMEOUT, term: bool = False) -> int | None:
    """Wait for child ``pid`` (SIGTERM it first if ``term``), SIGKILL it by pid if it lingers; its wait status."""
    if term:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    log(f"child {pid} did not exit within {timeout:.0f}s; killing it")
    try:
        os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]
    except (ProcessLookupError, ChildProcessError):
        return None


def describe_status(status: int | None) -> str:
    if status is None:
        return "unknown (already reaped)"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"wait status {status}"


def exited_ok(status: int | None) -> bool:
    return status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def die_with_parent() -> None:
    """SIGTERM this process (a child, or a server as its preexec_fn) if the script dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# -- the Manager child -------------------------------------------------------------


class _Stop(BaseException):
    """Raised by the Manager child's SIGTERM handler to leave serve_forever()."""


def _on_sigterm(signum, frame):
    raise _Stop


def manager_child(address: str, secret: bytes, ready_w: int) -> None:
    """Body of the Manager process: create the Manager here (it belongs to its creator), serve."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    die_with_parent()  # SIGTERM (a clean stop) if the script is killed without cleaning up
    from django_clustershm.manager import Manager

    manager = None
    try:
        manager = Manager(address, secret)
        os.write(ready_w, b"ok")
        os.close(ready_w)
        manager.serve_forever()  # shuts the Manager down in its finally clause when _Stop interrupts it
    except _Stop:
        pass
    except BaseException as exc:  # tell the parent why we could not start
        try:
            os.write(ready_w, f"error: {exc!r}".encode())
        except OSError:
            pass
        raise
    finally:
        if manager is not None:
            manager.close()  # removes the socket file


def fork_manager(address: str, secret: bytes) -> tuple[int, int]:
    """Fork the Manager child serving on ``address``; its pid and the read end of its readiness pipe."""
    ready_r, ready_w = os.pipe()
    try:
        pid = fork(manager_child, address, secret, ready_w)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    return pid, ready_r


def wait_manager_ready(ready_r: int, error: type[Exception] = RuntimeError, timeout: float = 10.0) -> None:
    """Wait for the Manager child's word on ``ready_r`` (closed here); raise ``error`` unless it is "ok"."""
    try:
        readable, _, _ = select.select([ready_r], [], [], timeout)
        if not readable:
            raise error(f"the Manager did not start within {timeout:.0f}s")
        msg = os.read(ready_r, 4096)
        if msg != b"ok":
            raise error(f"the Manager failed to start: {msg.decode(errors='replace') or 'it exited'}")
    finally:
        os.close(ready_r)


def stop_manager(pid: int, address: str | None) -> list[str]:
    """SIGTERM the Manager child, reap it and check that it exited 0 and removed its socket; the warnings."""
    warnings = []
    status = reap(pid, term=True)
    if not exited_ok(status):
        warnings.append(f"the Manager process {pid} ended with {describe_status(status)}")
    elif address and os.path.exists(address):
        warnings.append("the Manager left its socket behind")
    return warnings


# -- servers and the temp dir ---------------------------------------------------------


def spawn_server(argv: list[str], log_path: str, cwd: str) -> subprocess.Popen:
    """Start a server in its own session (Ctrl-C reaches the script, which stops it by pid), output to a log file."""
    with open(log_path, "wb") as logfile:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def log_tail(log_path: str) -> str:
    """The last 2000 bytes of a server's log file ("" if there is none)."""
    try:
        with open(log_path, "rb") as fh:
            return fh.read()[-2000:].decode(errors="replace").strip()
    except OSError:
        return ""


def redis_argv(binary: str, path: str, tmpdir: str) -> list[str]:
    """redis-server on the Unix socket ``path`` only (no TCP), no persistence, in the foreground."""
    return [
        binary, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", tmpdir, "--daemonize", "no",
    ]  # fmt: skip


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_tmpdir(tmpdir: str) -> list[str]:
    shutil.rmtree(tmpdir, ignore_errors=True)
    return [f"could not remove {tmpdir}"] if os.path.exists(tmpdir) else []


def describe_returncode(rc: int | None) -> str:
    """A ``Popen.returncode`` in words."""
    if rc is None:
        return "still running"
    return f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"


def program_version(argv: list[str]) -> str:
    """The first line a ``--version``-like command prints, or "?"."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


class Lab:
    """A private (0700) temp dir, a Manager child and servers (redis-server on a
    Unix socket, ...), each started and stopped by pid.

    Subclasses add what else their benchmark starts; ``close()`` stops it all.
    """

    def __init__(self, prefix: str) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=prefix)  # mode 0700
        self.manager_pid: int | None = None
        self.manager_address: str | None = None
        self.manager_secret: bytes | None = None
        self._configured = False
        self.servers: dict[str, subprocess.Popen] = {}
        self.redis_path: str | None = None
        self.versions: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.tmpdir, name)

    # -- the Manager

    def start_manager(self, configure: bool = True) -> None:
        """Fork the Manager; with ``configure``, point this process (and every
        child forked from here on) at it."""
        address = self.path("manager.sock")
        secret = os.urandom(32)
        self.manager_pid, ready_r = fork_manager(address, secret)
        wait_manager_ready(ready_r, BenchError)
        self.manager_address, self.manager_secret = address, secret
        if configure:
            import django_clustershm

            django_clustershm.configure(address, secret)  # inherited by every process forked from here on
            self._configured = True
            if not django_clustershm.ping():
                raise BenchError("the Manager does not answer")

    # -- servers

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        try:
            proc = spawn_server(argv, self.path(f"{name}.log"), self.tmpdir)
        except OSError as exc:
            raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
        self.servers[name] = proc
        return proc

    def _log_tail(self, name: str) -> str:
        return log_tail(self.path(f"{name}.log"))

    def _wait_server(self, name: str, proc: subprocess.Popen, probe, timeout: float = 10.0) -> None:
        """Until ``probe()`` stops raising OSError; BenchError if the server exits or the time runs out."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited at once ({describe_returncode(proc.returncode)}):\n{self._log_tail(name)}")
            try:
                probe()
                return
            except OSError as exc:
                last_error = exc
            time.sleep(0.02)
        raise BenchError(f"{name} did not answer within {timeout:.0f}s ({last_error}):\n{self._log_tail(name)}")

    def start_redis(self, binary: str | None = None) -> None:
        binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        path = self.path("redis.sock")
        if len(path.encode()) > 100:
            raise BenchError(f"the Unix socket path {path!r} is too long; set TMPDIR to a shorter directory")
        proc = self._spawn("redis-server", redis_argv(binary, path, self.tmpdir))

        def probe():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(path)
                s.sendall(b"PING\r\n")
                if not s.recv(64).startswith(b"+PONG"):
                    raise OSError("no PONG")

        self._wait_server("redis-server", proc, probe)
        self.redis_path = path
        text = program_version([binary, "--version"])  # "Redis server v=7.0.15 sha=... build=..."
        self.versions["redis-server"] = text.split("v=", 1)[1].split()[0] if "v=" in text else text

    # -- cleanup

    def close(self) -> list[str]:
        """Stop the Manager and every server by pid, reap them, remove the temp dir; return warnings."""
        warnings = []
        if self.manager_pid is not None:
            if self._configured:
                import django_clustershm

                django_clustershm.configure(None)  # closes our connection
                self._configured = False
            warnings += stop_manager(self.manager_pid, self.manager_address)
            self.manager_pid = None
        for name, proc in self.servers.items():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM to proc.pid
                try:
                    proc.wait(REAP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    warnings.append(f"{name} (pid {proc.pid}) ignored SIGTERM; killed")
                    proc.kill()
                    proc.wait()
                else:
                    if proc.returncode != 0:
                        warnings.append(f"{name} (pid {proc.pid}) ended with {describe_returncode(proc.returncode)}")
            else:
                warnings.append(f"{name} (pid {proc.pid}) had exited by itself: {describe_returncode(proc.returncode)}")
        self.servers.clear()
        return warnings + remove_tmpdir(self.tmpdir)


# -- timing and summaries -------------------------------------------------------------


def time_block(fn, count: int, out: list) -> None:
    """Call ``fn`` ``count`` times, appending each call's duration (seconds, perf_counter) to ``out``."""
    clock = time.perf_counter
    append = out.append
    for _ in range(count):
        t0 = clock()
        fn()
        append(clock() - t0)


@contextlib.contextmanager
def gc_paused():
    """Collect, then keep the garbage collector off for the block (restored as it was)."""
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_was_enabled:
            gc.enable()


def time_interleaved(ops: dict, n: int, warmup: int, block: int, pause: dict | None = None) -> dict:
    """Time every zero-argument callable of ``ops`` (name -> fn) ``n`` times; name -> list of seconds.

    ``warmup`` untimed calls of each first; then blocks of ``block`` calls of
    every operation in turn, until each has ``n``, so that drift in the
    machine's load affects every operation alike; the garbage collector is
    paused meanwhile. ``pause`` (name -> pid) names a process to SIGSTOP while
    that operation is timed (SIGCONT after).
    """
    for fn in ops.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list] = {name: [] for name in ops}
    with gc_paused():
        remaining = n
        while remaining > 0:
            count = min(block, remaining)
            for name, fn in ops.items():
                other = pause.get(name) if pause else None
                if other:
                    os.kill(other, signal.SIGSTOP)
                try:
                    time_block(fn, count, samples[name])
                finally:
                    if other:
                        os.kill(other, signal.SIGCONT)
            remaining -= count
    return samples


def rank(sorted_values: list, q: float):
    """Nearest-rank percentile of an already sorted list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarise_us(samples: dict) -> dict:
    """name -> durations in seconds (sorted in place) to name -> median and p99 (nearest rank) in µs, and n."""
    results = {}
    for name, values in samples.items():
        values.sort()
        results[name] = {
            "median_us": statistics.median(values) * 1e6,
            "p99_us": rank(values, 0.99) * 1e6,
            "n": len(values),
        }
    return results


def fmt_us(x) -> str:
    """Microseconds for a Markdown cell: one decimal below 1000, thousands separators above, "-" for None."""
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


# -- the report ----------------------------------------------------------------------


def package_versions(dists, missing: str | None = "not installed") -> list[str]:
    """"name version" of each installed distribution; "name <missing>" for the others, or nothing if None."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in dists:
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            if missing is not None:
                parts.append(f"{dist} {missing}")
    return parts


def write_json(path: str, report: dict) -> None:
    """Write ``report`` as indented JSON to ``path``, creating its directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
