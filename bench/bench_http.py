"""HTTP benchmark: ``manage.py runcluster`` against plain gunicorn with Django's RedisCache, under wrk.

Whole requests to the testproject's ``/bench/`` (one ``cache.get``, one ``cache.incr``), 4 sync workers per server,
one server after the other: requests/s and latency percentiles, and the shared counter, which must match the
requests served (README.md has the setup and the checks). Only the ratio within one run counts.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import lab
from lab import clustershm

WORKERS = 4
WRK_THREADS = 2
WRK_CONNECTIONS = 16
WARMUP_THREADS = 16
START_TIMEOUT = 60.0  # seconds for a server to answer and have all its workers
STOP_TIMEOUT = 40.0  # more than gunicorn's 30 s graceful timeout
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def bench_count(port: int) -> int:
    """One ``GET /bench/``: the counter's new value (BenchError unless 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/bench/")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise lab.BenchError(f"GET /bench/ answered {resp.status}: {body[:300].decode(errors='replace')}")
    return int(json.loads(body)["count"])


def children_of(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``, from /proc."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time not idle during ``seconds`` (from /proc/stat), or None if unknown."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if total1 <= total0 else 1.0 - (idle1 - idle0) / (total1 - total0)


def wrk_argv(seconds: int, url: str) -> list[str]:
    return ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency", url]


def parse_wrk(output: str) -> dict:
    """requests/s, latency percentiles (ms), completed requests, errors, from wrk's --latency report."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)\s*$", output, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output, re.MULTILINE)
    percentiles = {m[1].split(".")[0]: float(m[2]) * _UNITS_MS[m[3]]
                   for m in re.finditer(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)}  # fmt: skip
    if not rps or not requests or any(p not in percentiles for p in ("50", "90", "99")):
        raise lab.BenchError(f"cannot parse wrk's output:\n{output}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": float(rps[1]),
        "latency_ms": {f"p{p}": percentiles[p] for p in sorted(percentiles, key=float)},
        "requests": int(requests[1]),
        "duration_s": float(requests[2]) * _UNITS_MS[requests[3]] / 1e3,
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups() if errors else
                                                                                 (0, 0, 0, 0)), strict=True)),
        "non_2xx": int(non2xx[1]) if non2xx else 0,
    }  # fmt: skip


def measure(bench: lab.Lab, name: str, argv: list[str], env: dict, args) -> dict:
    """Start server ``name``, warm it up, run wrk, check the counter, stop it; the figures and the problems."""
    port = lab.free_port()
    argv = [a.replace("PORT", str(port)) for a in argv]
    counts: list[int] = []  # the counter's value in every answer before wrk

    def ready() -> bool:
        try:
            counts.append(bench_count(port))  # a refused connection is an OSError: not yet
        except lab.BenchError:
            return False
        return len(children_of(bench.servers[name].pid)) == WORKERS

    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **env}.items() if v is not None}
    tree = os.path.dirname(os.path.dirname(os.path.abspath(clustershm.__file__)))  # its testproject, else ours
    cwd = tree if os.path.exists(os.path.join(tree, "testproject", "settings_redis.py")) else lab.ROOT
    try:
        proc = bench.spawn(name, argv, ready, env=env, cwd=cwd, timeout=START_TIMEOUT)
        with ThreadPoolExecutor(WARMUP_THREADS) as pool:  # every warm-up request must answer 200
            counts.extend(pool.map(lambda _: bench_count(port), range(args.warmup)))
        bench.check(name)
        done = subprocess.run(wrk_argv(args.seconds, f"http://127.0.0.1:{port}/bench/"), capture_output=True,
                              text=True, timeout=args.seconds + 60, check=False)  # fmt: skip
        if done.returncode != 0:
            raise lab.BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        result = parse_wrk(done.stdout)
        bench.check(name)
        time.sleep(0.5)  # let the server finish what wrk left in flight
        final = bench_count(port)
        workers = sorted(children_of(proc.pid))
    finally:
        problems = bench.stop(name, STOP_TIMEOUT) if name in bench.servers else []
    expected = len(counts) + result["requests"] + 1  # the final GET counts itself
    excess = WRK_CONNECTIONS + sum(result["socket_errors"].values())
    if max(counts) != len(counts):
        problems.append(f"counter after warm-up {max(counts)} != {len(counts)} requests")
    if not 0 <= final - expected <= excess:
        problems.append(f"final counter off by {final - expected:+d} (expected 0..+{excess})")
    if result["non_2xx"]:
        problems.append(f"{result['non_2xx']} non-2xx answers")
    result.update(wrk_output=done.stdout, workers=workers, warmup_requests=len(counts), count_after_warmup=max(counts),
                  final_count=final, expected_count=expected, count_difference=final - expected, allowed_excess=excess,
                  command=" ".join(argv), exit_status=proc.returncode, problems=problems)  # fmt: skip
    return result


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"seconds": 2, "warmup": 100}, seconds=(lab.count, 10, "duration of each wrk run"),
                       warmup=(lab.count0, 1000, "warm-up requests per server"))  # fmt: skip
    lab.need(binaries=["wrk", "redis-server"], modules=["gunicorn", "redis"])
    busy = cpu_busy()
    results: dict[str, dict] = {}
    with lab.Lab("http") as bench:
        results[f"runcluster ({WORKERS} workers, ClusterShmCache)"] = measure(
            bench, "runcluster", [sys.executable, "manage.py", "runcluster", "--workers", str(WORKERS), "--bind",
                                  "127.0.0.1:PORT", "--log-level", "warning"],
            {"DJANGO_SETTINGS_MODULE": "testproject.settings", "REDIS_URL": None}, args)  # fmt: skip
        redis_url = f"unix://{bench.start_redis()}"
        results[f"gunicorn ({WORKERS} workers) + RedisCache"] = measure(
            bench, "gunicorn", [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:PORT",
                                "testproject.wsgi"],
            {"DJANGO_SETTINGS_MODULE": "testproject.settings_redis", "REDIS_URL": redis_url}, args)  # fmt: skip

    first, redis = results.values()
    base = redis["requests_per_s"]
    rows = [[name, f"{r['requests_per_s']:.0f}", *(f"{r['latency_ms'][k]:.2f}" for k in ("p50", "p90", "p99")),
             lab.fmt_x(r["requests_per_s"], base)] for name, r in results.items()]  # fmt: skip
    checks = []
    for name, r in results.items():
        errs = ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items())
        verdict = "ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
        checks.append(f"- {name}: counter {r['final_count']}, expected {r['expected_count']} ({r['warmup_requests']} "
                      f"probe + warm-up + {r['requests']} wrk + 1), difference {r['count_difference']:+d} (0..+"
                      f"{r['allowed_excess']} allowed for wrk's in-flight requests); non-2xx {r['non_2xx']}; socket "
                      f"errors {errs}; exit status on SIGTERM {r['exit_status']}: {verdict}")  # fmt: skip
    wrk = " ".join(wrk_argv(args.seconds, "http://127.0.0.1:PORT/bench/"))
    bench.versions["wrk"] = lab.version_of(["wrk", "-v"], r"wrk (\S+)")
    text = [
        lab.header(f"django-clustershm HTTP benchmark: GET /bench/ (one cache.get + one cache.incr), {WORKERS} sync "
                   f"gunicorn workers per server, {bench.elapsed:.0f}s", bench.versions),
        lab.table(["server", "requests/s", "p50 latency (ms)", "p90 latency (ms)", "p99 latency (ms)",
                   "requests/s / Redis"], rows),
        f"wrk command line: {wrk} (after {args.warmup} warm-up requests from {WARMUP_THREADS} threads)\n"
        f"machine: CPUs {'unknown' if busy is None else f'{busy:.0%}'} busy in the second before the run; the load "
        "generator (wrk) shares the CPUs with the server, so only ratios within one run count."
        + ("\nwarning: the machine was already busy when the run started; other processes skew these figures."
           if busy is not None and busy > 0.25 else ""),
        "Correctness (the counter after the run vs. probe + warm-up + wrk's requests + the final GET):\n"
        + "\n".join(checks),
    ]  # fmt: skip
    report = {"workers": WORKERS, "wrk": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS, "command": wrk},
              "cpu_busy_before": busy, "results": {n: {**r, "ratio_to_redis": r["requests_per_s"] / base}
                                                   for n, r in results.items()}}  # fmt: skip
    headlines = {"runcluster requests/s": (first["requests_per_s"], "higher"),
                 "runcluster / gunicorn+Redis requests/s": (first["requests_per_s"] / base, "higher")}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=any(r["problems"] for r in results.values()))


if __name__ == "__main__":
    lab.run(main)
