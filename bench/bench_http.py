"""HTTP benchmark: ``manage.py runcluster`` against plain gunicorn on Django's RedisCache, under wrk.

Run by hand from the repository root (it is not part of the test suite)::

    python bench/bench_http.py                 # 10 s of wrk per server
    python bench/bench_http.py --seconds 30 --json bench/results/http.json

Needs ``wrk`` and ``redis-server`` on the PATH (``apt-get install -y wrk
redis-server``) and the Python packages ``gunicorn`` and ``redis``; it stops
with a one-line message and a non-zero status if one is missing.

What it measures
----------------
Whole requests per second, and their latency, of the ``testproject`` view
``/bench/`` (``testproject/demo/views.py``: one ``cache.get`` and one
``cache.incr`` of Django's default cache) served by 4 sync gunicorn workers,
in two setups started one after the other in the same run:

1. ``python manage.py runcluster --workers 4 --bind 127.0.0.1:PORT
   --log-level warning``: the cache is ``ClusterShmCache``, the Manager runs
   in gunicorn's master and the workers talk to it over a Unix socket;
2. ``python -m gunicorn -w 4 -b 127.0.0.1:PORT testproject.wsgi`` with
   ``DJANGO_SETTINGS_MODULE=testproject.settings_redis``: the same project on
   ``django.core.cache.backends.redis.RedisCache``, talking to a
   ``redis-server`` this script starts on a Unix socket in a private temporary
   directory (``--port 0 --save '' --appendonly no``: no TCP, no persistence).

For each setup the script starts the server in its own session and process
group (output to a log file in the temporary directory), waits until
``/bench/`` answers 200 and all 4 workers are up, warms up with ``--warmup``
requests from 16 client threads, then runs::

    wrk -t2 -c16 -d10s --latency http://127.0.0.1:PORT/bench/

and parses requests/s and the 50th, 90th and 99th latency percentiles from
wrk's report. Then it stops the server with SIGTERM and checks that the
master exits 0 and leaves nothing in its process group (only if it does not
exit in time is the group killed with SIGKILL). Redis is stopped by pid the
same way. Every process is stopped by the pid or process group this script
started; the temporary directory is removed.

Correctness check
-----------------
Every request increments one shared counter, and the view returns its new
value. Both servers start with an empty cache, so after the run the counter
should equal every request the servers completed: the readiness probe and
the warm-up requests (all answered 200, counted exactly), the requests wrk
reports, and the final ``GET /bench/`` that reads it. wrk does not count the
requests still in flight when its time is up, though the server may finish
them, so the counter may exceed that sum by up to the 16 connections (plus
any request wrk lost to a socket error), but never fall short of it (a
shortfall would be a lost update). In practice every connection has a
request in flight when wrk stops, so expect a difference of +14 to +16. The
script prints the counter, the expected sum and their difference. A
difference outside that range, a non-2xx answer, a server that does not exit
0 on SIGTERM, or anything left running makes it exit with status 1 after the
report.

How to read it
--------------
One Markdown table: per server, requests/s, the latency percentiles in
milliseconds, and the ratio of its requests/s to the Redis setup's.

The reference machine has 2 cores and wrk runs on them too: the load
generator, the 4 workers, the master (and the Manager in it) or redis-server
all compete for the same CPUs, so the absolute figures are far below what
the servers could do alone and depend on the machine and its load. Only the
ratio between the two setups measured in the same run is meaningful; do not
compare absolute requests/s between runs or machines.

The two setups run one after the other, so drift in the machine's load
affects them differently: another benchmark running at the same time can
turn the ratio upside down. The report says how busy the CPUs were in the
second before the run and warns above 25%; if two runs disagree widely,
compare a few runs before drawing a conclusion.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for _common
from _common import free_port, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 4
WRK_THREADS = 2
WRK_CONNECTIONS = 16
WARMUP_THREADS = 16
PERCENTILES = ("50", "90", "99")
START_TIMEOUT = 60.0  # seconds for a server to answer and have all its workers
STOP_TIMEOUT = 40.0  # more than gunicorn's 30 s graceful timeout


class BenchError(Exception):
    """Something went wrong that ends the run (the cleanup still happens)."""


class _Terminated(BaseException):
    """Raised by our SIGTERM handler so that ``finally`` clauses clean up."""


def _on_sigterm(signum, frame):
    raise _Terminated


# -- small helpers -----------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def bench_count(port: int) -> int:
    """One ``GET /bench/``: the counter's new value (raises unless 200)."""
    status, body = http_get(port, "/bench/")
    if status != 200:
        raise BenchError(f"GET /bench/ answered {status}: {body[:300].decode(errors='replace')}")
    return int(json.loads(body)["count"])


def children_of(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent not idle during ``seconds`` (from /proc/stat), or None if unknown."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal (guest time is already in user)

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else 1.0 - (idle1 - idle0) / total


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


class Started:
    """A process this script started in its own session (so its pid is its process group)."""

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict, cwd: str) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        self.stopped = False
        self.returncode: int | None = None
        self.killed = False
        self.leftovers = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.proc.returncode}; its log ends:\n{tail(self.log_path)}"
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process; SIGKILL its process group only if it does not exit in time or leaves members behind."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:.0f}s; killing its process group",
                          file=sys.stderr)
                    self.killed = True
            self.returncode = self.proc.poll()
            # Give exiting members of the group (workers) a moment, then make sure none is left.
            deadline = time.monotonic() + 5
            while group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_alive(self.pid):
                self.leftovers = not self.killed
                if self.leftovers:
                    print(f"{self.name}: processes left in group {self.pid} after the leader exited; killing them",
                          file=sys.stderr)
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.wait(5)
            if self.returncode is None:
                self.returncode = self.proc.returncode
        finally:
            self._log.close()

    @property
    def clean_exit(self) -> bool:
        return self.returncode == 0 and not self.killed and not self.leftovers


def wait_until(predicate, timeout: float, what: str, proc: Started, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}; the log of {proc.name} ends:\n"
                             f"{tail(proc.log_path)}")
        time.sleep(interval)


# -- wrk -------------------------------------------------------------------------

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.M)
_SOCKET_ERRORS_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_argv(seconds: int, url: str) -> list[str]:
    return ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency", url]


def parse_wrk(output: str) -> dict:
    """requests/s, latency percentiles (ms), completed requests, errors, from wrk's --latency report."""
    rps = _RPS_RE.search(output)
    requests = _REQUESTS_RE.search(output)
    percentiles = {m.group(1).split(".")[0]: float(m.group(2)) * _UNITS_MS[m.group(3)]
                   for m in _PERCENTILE_RE.finditer(output)}
    if not rps or not requests or any(p not in percentiles for p in PERCENTILES):
        raise BenchError(f"cannot parse wrk's output:\n{output}")
    errors = _SOCKET_ERRORS_RE.search(output)
    non2xx = _NON2XX_RE.search(output)
    return {
        "requests_per_s": float(rps.group(1)),
        "latency_ms": {f"p{p}": percentiles[p] for p in sorted(percentiles, key=float)},
        "requests": int(requests.group(1)),
        "duration_s": float(requests.group(2)) * _UNITS_MS[requests.group(3)] / 1e3,
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
        if errors else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


# -- one server ------------------------------------------------------------------


def measure(server: Started, port: int, seconds: int, warmup: int) -> dict:
    """Wait for ``server``, warm it up, run wrk, check the counter; the caller stops the server."""
    counts: list[int] = []  # the counter's value in every answer before wrk

    def ready() -> bool:
        try:
            status, body = http_get(port, "/bench/", timeout=30)
        except OSError:
            return False
        if status == 200:
            counts.append(int(json.loads(body)["count"]))
        return status == 200

    wait_until(ready, START_TIMEOUT, f"{server.name} to answer /bench/", server)
    wait_until(lambda: len(children_of(server.pid)) == WORKERS, START_TIMEOUT, f"{WORKERS} workers of {server.name}",
               server)

    # Warm-up: every request must answer 200, so that all of them are counted exactly.
    with ThreadPoolExecutor(WARMUP_THREADS) as pool:
        counts.extend(pool.map(lambda _: bench_count(port), range(warmup)))
    sent_before = len(counts)  # the readiness probe that answered 200, and the warm-up
    count_after_warmup = max(counts)
    server.check_alive()

    url = f"http://127.0.0.1:{port}/bench/"
    argv = wrk_argv(seconds, url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    result = parse_wrk(done.stdout)
    server.check_alive()

    time.sleep(0.5)  # let the server finish what wrk left in flight
    final = bench_count(port)
    expected = sent_before + result["requests"] + 1  # the final GET counts itself
    result.update(
        {
            "wrk_output": done.stdout,
            "workers": sorted(children_of(server.pid)),
            "warmup_requests": sent_before,
            "count_after_warmup": count_after_warmup,
            "final_count": final,
            "expected_count": expected,
            "count_difference": final - expected,
        }
    )
    return result


def allowed_excess(result: dict) -> int:
    """How far the counter may exceed the sum: wrk's in-flight requests, and any it lost to a socket error."""
    return WRK_CONNECTIONS + sum(result["socket_errors"].values())


def judge(result: dict, server: Started) -> list[str]:
    """What is wrong with this server's run (empty if nothing)."""
    problems = []
    if result["count_after_warmup"] != result["warmup_requests"]:
        problems.append(f"counter after warm-up {result['count_after_warmup']} != {result['warmup_requests']} requests")
    if not 0 <= result["count_difference"] <= allowed_excess(result):
        problems.append(f"final counter off by {result['count_difference']:+d} (expected 0..+{allowed_excess(result)})")
    if result["non_2xx"]:
        problems.append(f"{result['non_2xx']} non-2xx answers")
    if server.killed:
        problems.append("did not exit on SIGTERM (process group killed)")
    elif server.returncode != 0:
        problems.append(f"exited with status {server.returncode} on SIGTERM")
    if server.leftovers:
        problems.append("left processes in its group")
    return problems


def run_runcluster(tmpdir: str, seconds: int, warmup: int) -> tuple[dict, Started]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    env.pop("REDIS_URL", None)
    argv = [sys.executable, "manage.py", "runcluster", "--workers", str(WORKERS),
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]  # fmt: skip
    server = Started("runcluster", argv, os.path.join(tmpdir, "runcluster.log"), env, ROOT)
    try:
        result = measure(server, port, seconds, warmup)
    finally:
        server.stop()
    result["command"] = " ".join(argv)
    result["exit_status"] = server.returncode
    return result, server


def start_redis(tmpdir: str) -> tuple[Started, str]:
    import redis

    path = os.path.join(tmpdir, "redis.sock")
    argv = ["redis-server", "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no", "--dir", tmpdir]
    server = Started("redis-server", argv, os.path.join(tmpdir, "redis.log"), dict(os.environ), tmpdir)

    def ready() -> bool:
        if not os.path.exists(path):
            return False
        client = redis.Redis(unix_socket_path=path, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    try:
        wait_until(ready, 30, "redis-server", server)
    except BaseException:
        server.stop(10)
        raise
    return server, path


def run_gunicorn_redis(tmpdir: str, socket_path: str, seconds: int, warmup: int) -> tuple[dict, Started]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": "testproject.settings_redis",
           "REDIS_URL": f"unix://{socket_path}"}
    argv = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "testproject.wsgi"]
    server = Started("gunicorn + RedisCache", argv, os.path.join(tmpdir, "gunicorn.log"), env, ROOT)
    try:
        result = measure(server, port, seconds, warmup)
    finally:
        server.stop()
    result["command"] = "DJANGO_SETTINGS_MODULE=testproject.settings_redis REDIS_URL=unix://… " + " ".join(argv)
    result["exit_status"] = server.returncode
    return result, server


# -- report ----------------------------------------------------------------------


def table(results: dict, baseline: str) -> str:
    lines = [
        "| server | requests/s | p50 latency (ms) | p90 latency (ms) | p99 latency (ms) | requests/s / Redis |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = results[baseline]["requests_per_s"]
    for name, r in results.items():
        lat = r["latency_ms"]
        lines.append(f"| {name} | {r['requests_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} "
                     f"| {r['requests_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def versions() -> dict:
    import django
    import gunicorn
    import redis

    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "django": django.get_version(),
        "gunicorn": gunicorn.__version__,
        "redis_py": redis.__version__,
        "redis_server": (re.search(r"v=(\S+)", redis_server.stdout) or [None, "?"])[1],
        "wrk": ((wrk.stdout + wrk.stderr).split() or ["?", "?"])[1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=1000,
                        help=f"warm-up requests per server, from {WARMUP_THREADS} threads (default 1000)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0:
        parser.error("--seconds must be >= 1 and --warmup >= 0")

    missing = [tool for tool in ("wrk", "redis-server") if shutil.which(tool) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not found on the PATH: this benchmark needs both "
              f"(apt-get install -y {' '.join(missing)}).", file=sys.stderr)
        return 2
    for module in ("gunicorn", "redis"):
        try:
            __import__(module)
        except ImportError:
            print(f"error: the Python package {module!r} is missing (pip install {module}).", file=sys.stderr)
            return 2

    busy_before = cpu_busy()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    tmpdir = tempfile.mkdtemp(prefix="clustershm-bench-http-")
    results: dict[str, dict] = {}
    problems: dict[str, list[str]] = {}
    redis_server = None
    started = time.monotonic()
    try:
        name = f"runcluster ({WORKERS} workers, ClusterShmCache)"
        results[name], srv = run_runcluster(tmpdir, args.seconds, args.warmup)
        problems[name] = judge(results[name], srv)

        redis_server, socket_path = start_redis(tmpdir)
        name = f"gunicorn ({WORKERS} workers) + RedisCache"
        try:
            results[name], srv = run_gunicorn_redis(tmpdir, socket_path, args.seconds, args.warmup)
            problems[name] = judge(results[name], srv)
        finally:
            redis_server.stop(10)
        if not redis_server.clean_exit:
            problems[name].append(f"redis-server did not stop cleanly (status {redis_server.returncode})")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("interrupted; stopped everything this run started", file=sys.stderr)
        return 130
    finally:
        if redis_server is not None:
            redis_server.stop(10)
        shutil.rmtree(tmpdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started

    info = versions()
    baseline = list(results)[-1]
    cpus = os.cpu_count()
    print(f"django-clustershm HTTP benchmark: GET /bench/ (one cache.get + one cache.incr), {WORKERS} sync gunicorn "
          f"workers per server, Python {info['python']}, Django {info['django']}, gunicorn {info['gunicorn']}, "
          f"redis-server {info['redis_server']} (redis-py {info['redis_py']}), wrk {info['wrk']}, {elapsed:.0f}s")
    print()
    print(table(results, baseline))
    print()
    print(f"wrk command line: {' '.join(wrk_argv(args.seconds, 'http://127.0.0.1:PORT/bench/'))} "
          f"(after {args.warmup} warm-up requests from {WARMUP_THREADS} threads)")
    busy = "unknown" if busy_before is None else f"{busy_before:.0%}"
    print(f"machine: {cpus} CPUs, {platform.platform()}, CPUs {busy} busy in the second before the run; the load "
          "generator (wrk) shares the CPUs with the server, so only ratios within one run count.")
    if busy_before is not None and busy_before > 0.25:
        print("warning: the machine was already busy when the run started; other processes skew these figures.")
    print()
    print("Correctness (the counter after the run vs. readiness probe + warm-up + wrk's requests + the final GET):")
    for name, r in results.items():
        errs = r["socket_errors"]
        verdict = "ok" if not problems[name] else "FAILED: " + "; ".join(problems[name])
        print(f"- {name}: counter {r['final_count']}, expected {r['expected_count']} "
              f"({r['warmup_requests']} warm-up + {r['requests']} wrk + 1), difference {r['count_difference']:+d} "
              f"(0..+{allowed_excess(r)} allowed for wrk's in-flight requests); non-2xx {r['non_2xx']}; socket errors "
              f"connect {errs['connect']}, read {errs['read']}, write {errs['write']}, timeout {errs['timeout']}; "
              f"exit status on SIGTERM {r['exit_status']}: {verdict}")

    if args.json:
        report = {
            "benchmark": "bench_http",
            "seconds": args.seconds,
            "warmup": args.warmup,
            "wrk": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS,
                    "command": " ".join(wrk_argv(args.seconds, "http://127.0.0.1:PORT/bench/"))},
            "workers": WORKERS,
            "versions": info,
            "platform": platform.platform(),
            "cpus": cpus,
            "cpu_busy_before": busy_before,
            "elapsed_s": elapsed,
            "baseline": baseline,
            "results": {name: {**r, "ratio_to_redis": r["requests_per_s"] / results[baseline]["requests_per_s"],
                               "problems": problems[name]} for name, r in results.items()},
        }
        write_json(args.json, report)
        print(f"\nresults written to {args.json}")
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
