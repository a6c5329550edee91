"""The lab every benchmark script here shares (not a benchmark): forked children and servers in a private
temp dir, each stopped by its pid; timing and statistics; the options, the Markdown report and its JSON.
The scripts use only the package's public API (``from lab import clustershm``), so they measure whichever
tree is first on PYTHONPATH (compare.py sets it); every JSON report names the package it imported."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAP_TIMEOUT = 10.0  # seconds a process may take to exit before it is SIGKILLed
READY_TIMEOUT = 60.0  # seconds a forked child may take to connect and report


def package():
    """django_clustershm, imported on first use, so that compare.py, which only runs the scripts, never needs it."""
    try:
        import django_clustershm
    except ImportError:  # a checkout where the package is neither installed nor on PYTHONPATH
        sys.path.insert(0, ROOT)
        import django_clustershm
    return django_clustershm


def __getattr__(name: str):
    if name == "clustershm":
        return package()
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the Markdown report."""
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot go on (a missing tool, a server that does not start, a child that failed)."""


class Stop(BaseException):
    """Raised by a child's SIGTERM handler (``stop_on_sigterm``) to leave its loop cleanly."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise Stop

    signal.signal(signal.SIGTERM, handler)


# -- processes -----------------------------------------------------------------------


def die_with_parent() -> None:
    """SIGTERM this process if the script dies without cleaning up (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def fork(body, *args, close=()) -> int:
    """Fork a child that closes ``close`` (the parent's pipe ends), runs ``body(*args)`` and leaves with os._exit:
    0, or 1 after printing the exception. It ignores Ctrl-C (the script stops it by pid), SIGTERMed if the script dies."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent()
        for fd in close:
            os.close(fd)
        body(*args)
        status = 0
    except BaseException:  # a child reports any failure through its exit status
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def child(body, *args, close=()) -> tuple[int, Lines]:
    """``fork`` a child running ``body(*args, w)``, ``w`` a pipe's write end (``send``); its pid and the ``Lines`` it sends."""
    r, w = os.pipe()
    try:
        return fork(body, *args, w, close=[r, *close]), Lines(r)
    finally:
        os.close(w)


def reap(pid: int, timeout: float = REAP_TIMEOUT, term: bool = False) -> int | None:
    """Wait for child ``pid`` (SIGTERM it first if ``term``), SIGKILL it if it lingers; its return code, as Popen's."""
    if term:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ChildProcessError):
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() >= deadline:
                log(f"child {pid} did not exit within {timeout:g}s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                done = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        return os.waitstatus_to_exitcode(done[1])
    return None


def describe(rc: int | None) -> str:
    """A return code (``reap``'s or Popen's) in words."""
    return "an unknown status" if rc is None else f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"


def send(fd: int, msg: str) -> None:
    """One newline-terminated message into a pipe."""
    data = msg.encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


class Lines:
    """Newline-terminated messages from a child over a pipe, read with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def read(self, timeout: float, what: str) -> str:
        """The next message; TimeoutError after ``timeout`` seconds, BenchError if the child closed its end."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no {what} within {timeout:g}s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise BenchError(f"the child exited before sending {what} (see stderr)")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self.fd)


def _worker(body, index: int, args: tuple, go_r: int, out_w: int) -> None:
    def ready() -> None:
        """Tell the parent this worker is connected, then wait for the common start."""
        send(out_w, "ready")
        os.read(go_r, 1)  # EOF when the parent closes its end: the start signal

    send(out_w, json.dumps(body(index, ready, *args)))


def run_workers(count: int, body, args: tuple = (), timeout: float = 600.0) -> list:
    """Fork ``count`` workers running ``body(index, ready, *args)``, each calling ``ready()`` once connected and
    returning something JSON carries; start them together; their results in index order. BenchError (or TimeoutError,
    every worker SIGTERMed) if one fails or is not done ``timeout`` s after the start. Every worker is reaped."""
    go_r, go_w = os.pipe()
    workers: list[tuple[int, Lines]] = []
    done = False
    try:
        for index in range(count):
            workers.append(child(_worker, body, index, args, go_r, close=[go_w]))
        for pid, lines in workers:
            if lines.read(READY_TIMEOUT, f"word from worker {pid}") != "ready":
                raise BenchError(f"worker {pid} did not get ready")
        os.close(go_w)
        go_w = -1
        deadline = time.monotonic() + timeout
        results = [json.loads(w.read(deadline - time.monotonic(), f"result of worker {pid}")) for pid, w in workers]
        done = True
    finally:
        for fd in (go_w, go_r):
            if fd >= 0:
                os.close(fd)
        statuses = []
        for pid, lines in workers:
            lines.close()
            statuses.append((pid, reap(pid, timeout=REAP_TIMEOUT if done else 2.0, term=not done)))
    bad = [(pid, rc) for pid, rc in statuses if rc != 0]
    if bad:
        raise BenchError(f"{len(bad)} of {count} workers failed; worker {bad[0][0]}: {describe(bad[0][1])}")
    return results


# -- the lab: a temp dir, the Manager, the servers -------------------------------------


def _manager_child(address: str, secret: bytes, ready_w: int) -> None:
    """Body of the Manager process: create the Manager here (it belongs to its creator), serve until SIGTERM."""
    stop_on_sigterm()
    manager = package().Manager(address, secret)
    request_stop = getattr(manager, "request_stop", None)
    if request_stop is not None:
        # Asked to stop, the loop ends its round and closes (a Stop raised inside the loop was logged as its death).
        signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())
    try:
        send(ready_w, "ok")
        manager.serve_forever()  # shuts the Manager down in its own finally clause when Stop interrupts it
    except Stop:
        pass
    finally:
        manager.close()  # removes the socket file


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _answers(address, request: bytes, expect: bytes) -> bool:
    """Whether the server at ``address`` (a Unix socket's path, or (host, port)) answers ``request`` with ``expect``."""
    with socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        s.connect(address)
        s.sendall(request)
        return s.recv(64).startswith(expect)


def version_of(argv: list[str], pattern: str = r"(\S+)") -> str:
    """The first match of ``pattern`` in what a ``--version``-like command prints, or "?"."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


def need(binaries=(), modules=()) -> None:
    """BenchError naming every missing server binary and Python package, with how to install it."""
    problems = [f"'{b}' is not on the PATH (apt-get install -y {b})" for b in binaries if not shutil.which(b)]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            problems.append(f"the Python package '{module}' is missing (pip install -e '.[bench]')")
    if problems:
        raise BenchError("; ".join(problems))


class Lab:
    """A private temp dir and all a script starts in it, each stopped by pid in ``close()``, which leaving the
    ``with`` block calls, setting ``warnings`` and ``elapsed``."""

    def __init__(self, name: str) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=f"clustershm-bench-{name}-")  # mode 0700
        self.servers: dict[str, subprocess.Popen] = {}
        self.cleanups: list = []  # callables returning a list of warnings or None, run last first by close()
        self.versions: dict[str, str] = {}  # server name -> version
        self.manager_pid = self.address = self.secret = self.redis_path = self.memcached_port = None
        self.started = time.perf_counter()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.warnings = self.close()
        self.elapsed = time.perf_counter() - self.started

    def path(self, name: str) -> str:
        return os.path.join(self.tmpdir, name)

    def start_child(self, what: str, body, *args) -> tuple[int, Lines]:
        """``child(body, *args)``, SIGTERMed and reaped by ``close()`` (a warning unless it exits 0)."""
        pid, lines = child(body, *args)

        def stop() -> list[str]:
            lines.close()
            rc = reap(pid, term=True)
            return [] if rc == 0 else [f"{what} (pid {pid}) ended with {describe(rc)}"]

        self.cleanups.append(stop)
        return pid, lines

    def start_manager(self, configure: bool = True) -> None:
        """Fork the Manager serving on a socket in the temp dir; with ``configure``, point this process at it."""
        address, secret = self.address, self.secret = self.path("manager.sock"), os.urandom(32)
        self.cleanups.append(lambda: ["the Manager left its socket behind"] if os.path.exists(address) else [])
        self.manager_pid, lines = self.start_child("the Manager", _manager_child, address, secret)
        lines.read(READY_TIMEOUT, "word that the Manager started")
        if configure:
            self.configure()

    def configure(self) -> None:
        """Point this process, and every child forked from here on, at the Manager (until ``close()``)."""
        package().configure(self.address, self.secret)
        self.cleanups.append(lambda: package().configure(None))  # closes the connection before the Manager goes
        if not package().ping():
            raise BenchError("the Manager does not answer")

    def spawn(self, name: str, argv: list[str], probe, env=None, cwd=None, timeout: float = 30.0):
        """Start server ``name`` in its own session (its pid is its group), output to NAME.log in the temp dir;
        its Popen once ``probe()`` is true (an OSError counts as not yet)."""
        with open(self.path(f"{name}.log"), "wb") as out:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=cwd or self.tmpdir, env=env, start_new_session=True,
                                        preexec_fn=die_with_parent)  # fmt: skip  # preexec_fn: no threads yet
            except OSError as exc:
                raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
        self.servers[name] = proc
        deadline = time.monotonic() + timeout
        while True:
            self.check(name)
            with contextlib.suppress(OSError):
                if probe():
                    return proc
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not get ready within {timeout:g}s; its log ends:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def check(self, name: str) -> None:
        """BenchError if server ``name`` has exited."""
        proc = self.servers[name]
        if proc.poll() is not None:
            raise BenchError(f"{name} exited ({describe(proc.returncode)}); its log ends:\n{self.log_tail(name)}")

    def log_tail(self, name: str, size: int = 3000) -> str:
        try:
            with open(self.path(f"{name}.log"), "rb") as fh:
                return fh.read()[-size:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def stop(self, name: str, timeout: float = REAP_TIMEOUT) -> list[str]:
        """SIGTERM server ``name`` by pid and wait; SIGKILL its process group only if it does not exit
        in time or leaves processes in it; its warnings."""
        proc = self.servers.pop(name)
        warnings, killed = [], False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                warnings.append(f"{name} (pid {proc.pid}) ignored SIGTERM for {timeout:g}s; killed")
                killed = True
        deadline = time.monotonic() + 5.0  # members of its group (workers) exiting after it
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = _group_alive(proc.pid)
        if leftovers or killed:
            if leftovers and not killed:
                warnings.append(f"{name} left processes in its process group {proc.pid}; killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(5)
        if rc != 0 and not killed:
            warnings.append(f"{name} (pid {proc.pid}) ended with {describe(rc)}")
        return warnings

    def start_redis(self) -> str:
        """redis-server on a Unix socket in the temp dir only (no TCP), no persistence; the socket's path."""
        need(binaries=["redis-server"])
        path = self.redis_path = self.path("redis.sock")
        argv = ["redis-server", "--port", "0", "--unixsocket", path, "--unixsocketperm", "700", "--save", "",
                "--appendonly", "no", "--dir", self.tmpdir, "--daemonize", "no"]  # fmt: skip
        self.spawn("redis-server", argv, lambda: _answers(path, b"PING\r\n", b"+PONG"))
        self.versions["redis-server"] = version_of(["redis-server", "--version"], r"v=(\S+)")
        return path

    def start_memcached(self) -> int:
        """memcached on 127.0.0.1 and a free port, no UDP; the port."""
        need(binaries=["memcached"])
        port = self.memcached_port = free_port()
        argv = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
        argv += ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses to run as root without -u
        self.spawn("memcached", argv, lambda: _answers(("127.0.0.1", port), b"version\r\n", b"VERSION"))
        self.versions["memcached"] = version_of(["memcached", "-V"], r"memcached (\S+)")
        return port

    def close(self) -> list[str]:
        """Stop everything this lab started, by pid, and remove the temp dir; log and return the warnings."""
        warnings = []
        while self.cleanups:
            warnings += self.cleanups.pop()() or []
        for name in list(self.servers):
            warnings += self.stop(name)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if os.path.exists(self.tmpdir):
            warnings.append(f"could not remove {self.tmpdir}")
        for warning in warnings:
            log(f"warning: {warning}")
        return warnings


# -- timing and statistics ------------------------------------------------------------


@contextlib.contextmanager
def gc_paused():
    """Collect, then keep the garbage collector off for the block (restored as it was)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: Untimed calls of an operation before each of its timed blocks (see time_interleaved).
SETTLE = 300


def time_interleaved(ops: dict, n: int, warmup: int, block: int, pause: dict | None = None) -> dict:
    """Time each callable of ``ops`` (name -> fn) ``n`` times after ``warmup`` calls, in blocks of ``block`` calls
    of each in turn, the GC paused; the summary of each. ``pause``: name -> a pid to SIGSTOP while it is timed."""
    for fn in ops.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list] = {name: [] for name in ops}
    clock = time.perf_counter
    with gc_paused():
        for start in range(0, n, block):
            for name, fn in ops.items():
                other = (pause or {}).get(name)
                if other:
                    os.kill(other, signal.SIGSTOP)
                append = samples[name].append
                try:
                    # Untimed calls first: a client's adaptive polling (it stops polling for up to 256 calls after
                    # slow replies) carries over from the previous block, so a fast operation timed right after a
                    # slow one measured either 16 or 35 us depending on the order (bench_cache's get hit).
                    for _ in range(min(SETTLE, warmup)):
                        fn()
                    for _ in range(min(block, n - start)):
                        t0 = clock()
                        fn()
                        append(clock() - t0)
                finally:
                    if other:
                        os.kill(other, signal.SIGCONT)
    return {name: summary(values) for name, values in samples.items()}


def rank(sorted_values: list, q: float):
    """Nearest-rank percentile of an already sorted list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summary(values, scale: float = 1e6) -> dict:
    """Median, p90, p99 (nearest rank), min, max of ``values`` times ``scale`` (s -> µs), or None; and their count."""
    v = sorted(values)
    figures = {"median_us": statistics.median, "p90_us": lambda v: rank(v, 0.90), "p99_us": lambda v: rank(v, 0.99),
               "min_us": lambda v: v[0], "max_us": lambda v: v[-1]}  # fmt: skip
    return {**{k: f(v) * scale if v else None for k, f in figures.items()}, "n": len(v)}


def rounds(values: list) -> dict:
    """Per-round figures: their median, range and spread ((max - min) / median)."""
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else None
    return {"median": median, "min": min(values), "max": max(values), "spread": spread, "values": list(values)}


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# -- options and the report -------------------------------------------------------------


def _at_least(cast, low, strict: bool = False):
    def parse(text: str):
        value = cast(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}")
        return value

    return parse


# argparse types: an int >= 1, an int >= 0, a duration > 0
count, count0, seconds = _at_least(int, 1), _at_least(int, 0), _at_least(float, 0, strict=True)


def counts(text: str) -> tuple[int, ...]:
    """argparse type: a comma-separated list of ints >= 0, sorted, without repeats."""
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError("integers >= 0")
    return values


def parser(doc: str, quick: str = "a smoke run of a few seconds (figures are not meaningful)"):
    """An argument parser described by the first paragraph of ``doc``, with ``--json PATH`` and ``--quick``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def options(doc: str, argv, quick: dict, peers: dict | None = None, **spec) -> argparse.Namespace:
    """The script's options: ``--json``, ``--quick`` (the ``quick`` values become the defaults; explicit options
    still win), ``--NAME`` for each ``NAME=(type, default, help)`` of ``spec`` (``n_slow``: ``--n-slow``; type
    ``bool``: a flag, off by default) and, with ``peers`` (name -> label), ``--only NAME,...``: ``args.selected``
    the chosen names, in peers' order."""
    p = parser(doc)
    for name, (kind, default, text) in spec.items():
        if kind is bool:
            p.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
            continue
        text += "" if default is None else f" (default {default:g})"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    if peers:
        p.add_argument("--only", metavar="NAME[,NAME]", help=f"run a subset of: {','.join(peers)}")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**quick)
        args = p.parse_args(argv)
    if peers:
        chosen = [n.strip().lower() for n in (args.only or "").split(",") if n.strip()]
        if (unknown := [n for n in chosen if n not in peers]) or (args.only and not chosen):
            p.error(f"--only: unknown name(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(peers)}")
        args.selected = [n for n in peers if n in chosen or not chosen]
    return args


def fmt(x, digits: int = 1) -> str:
    """A figure for a Markdown cell: "-" for None, thousands separators from 1000 on."""
    return "-" if x is None else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def fmt_x(a, b) -> str:
    """``a / b`` as "1.23x", or "n/a"."""
    return "n/a" if (r := ratio(a, b)) is None else f"{r:.2f}x"


def table(header: list[str], rows: list[list], align: str | None = None, title: str = "") -> str:
    """A Markdown table, under ``### title`` if given; ``align``: l or r per column (default: l, then all r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return (f"### {title}\n\n" if title else "") + "\n".join(lines)


def target(text: str, value: float | None, limit: float, at_least: bool = False, ok: bool = True) -> tuple[str, dict]:
    """A PASS/FAIL line and its JSON: ``value`` at most ``limit`` (at least, with ``at_least``), and ``ok``."""
    if value is None:
        return f"- not evaluated: {text}", {"value": None, "met": None}
    met = ok and (value >= limit if at_least else value <= limit)
    return f"- {'PASS' if met else 'FAIL'}: {text}", {"value": value, "min" if at_least else "max": limit, "met": met}


def targets(title: str, checks: dict) -> tuple[str, dict]:
    """``target`` for each key -> (text, value, limit[, at_least]) of ``checks``: the Markdown section and the JSON."""
    done = {key: target(*check) for key, check in checks.items()}
    return f"### {title}\n\n" + "\n".join(line for line, _ in done.values()), {k: t for k, (_, t) in done.items()}


def environment() -> dict:
    """What the JSON report says about the machine and the package under test."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for dist in ("django", "redis", "hiredis", "pymemcache", "diskcache", "gunicorn"):
        with contextlib.suppress(PackageNotFoundError):
            packages[dist] = version(dist)
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "allowed_cpus": sorted(os.sched_getaffinity(0)), "packages": packages,
            "package": os.path.dirname(os.path.abspath(package().__file__))}  # fmt: skip


def header(what: str, servers: dict | None = None) -> str:
    """The report's first line: what ran, and on what."""
    env = environment()
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    srv = "".join(f", {k} {v}" for k, v in (servers or {}).items())
    return (f"{what}. Python {env['python']}, {env['cpus']} CPUs (allowed: {env['allowed_cpus']}), {pk}{srv}; "
            f"django_clustershm from {env['package']}")  # fmt: skip


def finish(args, bench: Lab, text: list[str], report: dict, headlines: dict, failed=False) -> int:
    """Print the report's parts; with --json, write them with the environment, the lab's servers, time and warnings,
    and the headline figures compare.py reads (name -> (value, "higher" or "lower" is better)). The exit status:
    1 if ``failed`` or the lab had warnings."""
    print("\n\n".join(text))
    if args.json:
        data = {"benchmark": os.path.basename(sys.argv[0]).removesuffix(".py"), **environment(), "args": vars(args),
                "headline": {k: {"value": value, "better": better} for k, (value, better) in headlines.items()},
                "servers": bench.versions, "elapsed_s": bench.elapsed, "warnings": bench.warnings, **report}  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    return 1 if failed or bench.warnings else 0


def run(main) -> None:
    """Run ``main()``, its result the exit status; SIGTERM and Ctrl-C go through the finally clauses; BenchError: 2."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    name = os.path.basename(sys.argv[0])
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log(f"{name}: interrupted; everything it started has been stopped")
        sys.exit(130)
    except (BenchError, TimeoutError) as exc:
        log(f"{name}: cannot go on: {exc}")
        sys.exit(2)
