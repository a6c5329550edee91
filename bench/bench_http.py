"""HTTP benchmark: ``manage.py runcluster`` against plain gunicorn with Django's RedisCache, under wrk.

Whole requests to the testproject's ``/bench/`` (one ``cache.get``, one ``cache.incr``), 4 sync workers per server;
with ``--asgi``, to ``/abench/`` (``await cache.aget``, ``await cache.aincr``) through 4 uvicorn workers per server
(``runcluster --asgi`` against gunicorn with ``uvicorn_worker.UvicornWorker``). Both servers are up at once and wrk
runs against each in turn, ``--rounds`` times: requests/s and latency percentiles, medians over the rounds, and the
shared counter, checked against the requests served (README.md has the setup and the checks). Only the ratio within
one run counts. ``--work N``: the view spends N µs in a busy loop before each of its two cache calls, as a view
with work of its own does (the calls then meet a Manager and a client that stopped polling).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import statistics
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
UVICORN_WORKER = "uvicorn_worker.UvicornWorker"
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def bench_count(port: int, path: str) -> int:
    """One ``GET path``: the counter's new value (BenchError unless 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise lab.BenchError(f"GET {path} answered {resp.status}: {body[:300].decode(errors='replace')}")
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


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def uvicorn_flavour() -> str:
    """The event loop and HTTP parser uvicorn's "auto" picks: uvloop and httptools if installed."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn's {loop} loop and {'httptools' if importlib.util.find_spec('httptools') else 'h11'} parser"


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


def setups(asgi: bool, redis_url: str) -> tuple[str, dict]:
    """The path wrk requests, and the two servers: name -> label, command line (PORT: the port), environment, and
    whether the view's ``incr`` is atomic (the counter check is strict only then)."""
    cluster = {"DJANGO_SETTINGS_MODULE": "testproject.settings", "REDIS_URL": None}
    redis = {"DJANGO_SETTINGS_MODULE": "testproject.settings_redis", "REDIS_URL": redis_url}
    runcluster = [sys.executable, "manage.py", "runcluster", "--workers", str(WORKERS), "--bind", "127.0.0.1:PORT",
                  "--log-level", "warning"]  # fmt: skip
    gunicorn = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:PORT"]
    if not asgi:
        return "/bench/", {
            "runcluster": (f"runcluster ({WORKERS} workers, ClusterShmCache)", runcluster, cluster, True),
            "gunicorn": (f"gunicorn ({WORKERS} workers) + RedisCache", [*gunicorn, "testproject.wsgi"], redis, True),
        }
    # Django's RedisCache has no aincr of its own: BaseCache's is an aget, then an aset, which loses updates
    # between concurrent requests; its shortfall is a figure of the report, not a failure.
    return "/abench/", {
        "runcluster --asgi": (f"runcluster --asgi ({WORKERS} UvicornWorker workers, ClusterShmCache)",
                              [*runcluster, "--asgi"], cluster, True),
        "gunicorn + uvicorn": (f"gunicorn + UvicornWorker ({WORKERS} workers), RedisCache",
                               [*gunicorn, "-k", UVICORN_WORKER, "testproject.asgi:application"], redis, False),
    }  # fmt: skip


def start(bench: lab.Lab, name: str, argv: list[str], env: dict, path: str, warmup: int) -> dict:
    """Start server ``name``, wait for its answer and its workers, warm it up: its port, command and counts."""
    port = lab.free_port()
    argv = [a.replace("PORT", str(port)) for a in argv]
    counts: list[int] = []  # the counter's value in every answer before wrk

    def ready() -> bool:
        try:
            counts.append(bench_count(port, path))  # a refused connection is an OSError: not yet
        except lab.BenchError:
            return False
        return len(children_of(bench.servers[name].pid)) == WORKERS

    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **env}.items() if v is not None}
    tree = os.path.dirname(os.path.dirname(os.path.abspath(clustershm.__file__)))  # its testproject, else ours
    cwd = tree if os.path.exists(os.path.join(tree, "testproject", "settings_redis.py")) else lab.ROOT
    proc = bench.spawn(name, argv, ready, env=env, cwd=cwd, timeout=START_TIMEOUT)
    with ThreadPoolExecutor(WARMUP_THREADS) as pool:  # every warm-up request must answer 200
        counts.extend(pool.map(lambda _: bench_count(port, path), range(warmup)))
    bench.check(name)
    return {"port": port, "command": " ".join(argv), "proc": proc, "counts": counts}


def wrk_run(bench: lab.Lab, name: str, port: int, path: str, seconds: int) -> dict:
    """One wrk run against server ``name``: its figures."""
    done = subprocess.run(wrk_argv(seconds, f"http://127.0.0.1:{port}{path}"), capture_output=True, text=True,
                          timeout=seconds + 60, check=False)  # fmt: skip
    if done.returncode != 0:
        raise lab.BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    result = parse_wrk(done.stdout)
    time.sleep(0.5)  # let the server finish what wrk left in flight before the next run
    bench.check(name)
    return {**result, "wrk_output": done.stdout}


def settle(bench: lab.Lab, name: str, server: dict, runs: list[dict], path: str, atomic: bool) -> dict:
    """The final GET, the stop (SIGTERM, clean exit) and the counter's check for server ``name``: its figures."""
    final = bench_count(server["port"], path)
    workers = sorted(children_of(server["proc"].pid))
    problems = bench.stop(name, STOP_TIMEOUT)
    counts = server["counts"]
    expected = len(counts) + sum(r["requests"] for r in runs) + 1  # the final GET counts itself
    excess = WRK_CONNECTIONS * len(runs) + sum(sum(r["socket_errors"].values()) for r in runs)
    if atomic and max(counts) != len(counts):
        problems.append(f"counter after warm-up {max(counts)} != {len(counts)} requests")
    if final - expected > excess or (atomic and final < expected):
        problems.append(f"final counter off by {final - expected:+d} (expected 0..+{excess})")
    if non2xx := sum(r["non_2xx"] for r in runs):
        problems.append(f"{non2xx} non-2xx answers")
    return {"workers": workers, "warmup_requests": len(counts), "count_after_warmup": max(counts), "final_count": final,
            "expected_count": expected, "count_difference": final - expected, "allowed_excess": excess,
            "lost_updates_at_least": max(0, expected - final), "atomic_incr": atomic, "command": server["command"],
            "exit_status": server["proc"].returncode, "non_2xx": non2xx, "problems": problems}  # fmt: skip


def median_round(runs: list[dict]) -> dict:
    """requests/s over the rounds (lab.rounds), and the median of each latency percentile."""
    latency = {p: statistics.median(r["latency_ms"][p] for r in runs) for p in ("p50", "p90", "p99")}
    return {"requests_per_s": lab.rounds([r["requests_per_s"] for r in runs]), "latency_ms": latency}


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"seconds": 2, "warmup": 100, "rounds": 1},
                       seconds=(lab.count, 10, "duration of each wrk run"),
                       warmup=(lab.count0, 1000, "warm-up requests per server"),
                       rounds=(lab.count, 3, "wrk runs per server, the servers taking turns"),
                       asgi=(bool, False, "runcluster --asgi against gunicorn with uvicorn's worker, on /abench/"),
                       work=(lab.count0, 0, "µs of busy work the view does before its get and again before its incr "
                                            "(?work=N)"))  # fmt: skip
    lab.need(binaries=["wrk", "redis-server"], modules=["gunicorn", "redis"] + ["uvicorn_worker"] * args.asgi)
    busy = cpu_busy()
    results: dict[str, dict] = {}
    with lab.Lab("http") as bench:
        path, servers = setups(args.asgi, f"unix://{bench.start_redis()}")
        path += f"?work={args.work}" if args.work else ""
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        up = {}
        for name, (_, command, env, _) in servers.items():
            lab.log(f"starting {name} and warming it up")
            up[name] = start(bench, name, command, env, path, args.warmup)
        for index in range(args.rounds):  # the servers take turns, the first one rotating: drift hits both alike
            names = list(servers)[index % len(servers) :] + list(servers)[: index % len(servers)]
            for name in names:
                lab.log(f"round {index + 1}/{args.rounds}: wrk against {name}")
                runs[name].append(wrk_run(bench, name, up[name]["port"], path, args.seconds))
        for name, (_, _, _, atomic) in servers.items():
            results[name] = {**median_round(runs[name]), **settle(bench, name, up[name], runs[name], path, atomic),
                             "rounds": runs[name]}  # fmt: skip
        if args.asgi:
            for dist in ("uvicorn", "uvicorn-worker"):
                bench.versions[dist] = package_version(dist)
        bench.versions["wrk"] = lab.version_of(["wrk", "-v"], r"wrk (\S+)")

    first, redis = results.values()
    base = redis["requests_per_s"]["median"]
    rows = []
    for name, r in results.items():
        rps = r["requests_per_s"]
        rows.append([servers[name][0], lab.fmt(rps["median"]), f"{lab.fmt(rps['min'])} - {lab.fmt(rps['max'])} "
                     f"({rps['spread']:.0%})", *(f"{r['latency_ms'][k]:.2f}" for k in ("p50", "p90", "p99")),
                     lab.fmt_x(rps["median"], base), f"{r['lost_updates_at_least']:,}"])  # fmt: skip
    paired = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(*runs.values(), strict=True)]
    checks = []
    for name, r in results.items():
        errs = ", ".join(f"{k} {sum(x['socket_errors'][k] for x in r['rounds'])}" for k in ("connect", "read", "write",
                                                                                           "timeout"))  # fmt: skip
        verdict = "ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
        lost = "" if r["atomic_incr"] else (
            f"; this setup's aincr is not atomic (BaseCache's aget + aset): at least {r['lost_updates_at_least']:,} "
            f"updates lost, {r['warmup_requests'] - r['count_after_warmup']:,} of them in the warm-up")  # fmt: skip
        checks.append(f"- {servers[name][0]}: counter {r['final_count']:,}, expected {r['expected_count']:,} "
                      f"({r['warmup_requests']} probe + warm-up + wrk's + 1), difference {r['count_difference']:+,d} "
                      f"(0..+{r['allowed_excess']} allowed for wrk's in-flight requests){lost}; non-2xx "
                      f"{r['non_2xx']}; socket errors {errs}; exit status on SIGTERM {r['exit_status']}: {verdict}")  # fmt: skip
    wrk = " ".join(wrk_argv(args.seconds, f"http://127.0.0.1:PORT{path}"))
    what = (f"GET /abench/ (one await cache.aget + one await cache.aincr), {WORKERS} {UVICORN_WORKER} workers per "
            f"server ({uvicorn_flavour()})" if args.asgi else
            f"GET /bench/ (one cache.get + one cache.incr), {WORKERS} sync gunicorn workers per server")  # fmt: skip
    if args.work:
        what += f", the view spending {args.work} µs of busy work before each cache call ({path})"
    text = [
        lab.header(f"django-clustershm HTTP benchmark: {what}, {bench.elapsed:.0f}s", bench.versions),
        lab.table(["server", f"requests/s (median of {args.rounds})", "range over the rounds (spread)",
                   "p50 latency (ms)", "p90 latency (ms)", "p99 latency (ms)", "requests/s / Redis",
                   "lost counter updates (at least)"], rows),
        f"requests/s / Redis, round by round: {', '.join(f'{x:.2f}x' for x in paired)}. Latencies: the median over "
        f"the rounds of each round's percentile.\n"
        f"wrk command line: {wrk}, {args.rounds} time(s) per server, the servers taking turns, both up throughout "
        f"(after {args.warmup} warm-up requests each from {WARMUP_THREADS} threads)\n"
        f"machine: CPUs {'unknown' if busy is None else f'{busy:.0%}'} busy in the second before the run; the load "
        "generator (wrk) shares the CPUs with the server, so only ratios within one run count."
        + ("\nwarning: the machine was already busy when the run started; other processes skew these figures."
           if busy is not None and busy > 0.25 else ""),
        "Correctness (the counter after the run vs. probe + warm-up + wrk's requests + the final GET):\n"
        + "\n".join(checks),
    ]  # fmt: skip
    report = {"asgi": args.asgi, "work_us": args.work, "path": path, "workers": WORKERS, "rounds": args.rounds, "cpu_busy_before": busy,
              "wrk": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS, "command": wrk},
              "ratio_by_round": paired, "results": {n: {"label": servers[n][0], **r, "ratio_to_redis":
                                                        r["requests_per_s"]["median"] / base}
                                                    for n, r in results.items()}}  # fmt: skip
    rps, prefix = first["requests_per_s"]["median"], "runcluster --asgi" if args.asgi else "runcluster"
    peer = "gunicorn+uvicorn+Redis" if args.asgi else "gunicorn+Redis"
    prefix += f" (work {args.work} µs)" if args.work else ""
    headlines = {f"{prefix} requests/s": (rps, "higher"), f"{prefix} / {peer} requests/s": (rps / base, "higher")}
    return lab.finish(args, bench, text, report, headlines, failed=any(r["problems"] for r in results.values()))


if __name__ == "__main__":
    lab.run(main)
