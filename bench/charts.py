"""Charts for docs/benchmarks.md, drawn from the benchmark scripts' JSON (``--json PATH``).

    python bench/charts.py                                   # docs/benchmarks/data/*.json -> docs/benchmarks/*.png
    python bench/charts.py --data bench/results --out /tmp/charts

It reads ``core.json``, ``cache.json``, ``locks.json``, ``listeners.json``, ``http.json`` and
``redis.json`` (the JSON of bench_core.py, bench_cache.py... with those names) from ``--data``
and skips any that is missing. The JSON of the run the docs quote is kept in
docs/benchmarks/data/ (bench/results/ is not in git), so the charts can be drawn again, and
checked, from the figures the tables print. Needs matplotlib (not a dependency of the
package: ``pip install matplotlib``); exits 2 without it, as the other scripts do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS, PEER = "#0b6bcb", "#9aa4b2"


def load(data: str, name: str) -> dict | None:
    path = os.path.join(data, f"{name}.json")
    if not os.path.exists(path):
        print(f"charts: no {path}, skipped", file=sys.stderr)
        return None
    with open(path) as fh:
        return json.load(fh)


def bars(plt, path: str, title: str, labels: list[str], values: list[float], unit: str, *, log=False, ours=()):
    """One horizontal bar chart, ours in colour, each bar labelled with its value."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.3), dpi=110)
    colours = [OURS if label in ours else PEER for label in labels]
    ax.barh(labels, values, color=colours)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,.1f}" if value < 100 else f" {value:,.0f}", va="center", fontsize=9)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=11, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(right=max(values) * (3 if log else 1.18))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "docs", "benchmarks", "data"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks"))
    args = parser.parse_args()
    try:
        import matplotlib
    except ImportError:
        print("charts: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    core = load(args.data, "core")
    if core:
        names = list(core["results"])
        bars(
            plt, out("core.png"), "Core latency: one client, one Manager (median)",
            names, [core["results"][n]["median_us"] for n in names], "µs", ours=names[1:],
        )  # fmt: skip

    cache = load(args.data, "cache")
    if cache:
        backends = cache["backends"]
        labels = [b["label"] for b in backends.values()]
        ours = {b["label"] for key, b in backends.items() if key in ("clustershm", "near")}
        bars(
            plt, out("cache-get.png"), "Django cache backends: get hit, one process (median; log scale)",
            labels, [b["latency"]["get hit"]["median_us"] for b in backends.values()], "µs", log=True, ours=ours,
        )  # fmt: skip
        procs = str(max(int(p) for p in next(iter(backends.values()))["throughput"]))
        bars(
            plt, out("cache-throughput.png"), f"Django cache backends: {procs} processes, 90% get / 10% set",
            labels, [b["throughput"][procs]["ops_per_s"] for b in backends.values()], "operations/s", ours=ours,
        )  # fmt: skip

    locks = load(args.data, "locks")
    if locks:
        names = {
            "clustershm": "clustershm.Lock",
            "redis": "redis-py Lock",
            "diskcache": "diskcache.Lock",
            "multiprocessing": "multiprocessing Manager().Lock()",
        }
        keys = [k for k in names if k in locks["rmw"]]
        bars(
            plt, out("locks-rmw.png"), "Locked read-modify-write, 4 processes (median of the rounds)",
            [names[k] for k in keys], [locks["rmw"][k]["rounds"]["median"] for k in keys], "operations/s",
            ours={"clustershm.Lock"},
        )  # fmt: skip
        bars(
            plt, out("locks-latency.png"), "Lock acquire + release, uncontended (median)",
            [names[k] for k in keys], [locks["latency"][k]["median_us"] for k in keys], "µs",
            ours={"clustershm.Lock"},
        )  # fmt: skip

    listeners = load(args.data, "listeners")
    if listeners:
        results = listeners.get("results", listeners)
        names = {"clustershm": "clustershm.listen()", "redis": "Redis pub/sub (redis-py)"}
        labels, values = [], []
        for key, label in names.items():
            for stat in ("median", "p90", "p99"):
                labels.append(f"{label} {stat}")
                values.append(results[key][f"{stat}_us"])
        bars(
            plt, out("listeners.png"), "Delay from a write in one process to the callback in another",
            labels, values, "µs", ours={label for label in labels if label.startswith("clustershm")},
        )  # fmt: skip

    http = load(args.data, "http")
    if http:
        results = http.get("results", http)
        servers = [name for name in results if isinstance(results[name], dict) and "requests_per_s" in results[name]]
        bars(
            plt, out("http.png"), "HTTP: GET /bench/ (one cache get, one incr), 4 sync workers, wrk",
            servers, [results[s]["requests_per_s"] for s in servers], "requests/s",
            ours={s for s in servers if s.startswith("runcluster")},
        )  # fmt: skip

    redis = load(args.data, "redis")
    if redis:
        summary = redis["summary"]
        names = {"ours": "ours (Redis engine)", "redis": "Django RedisCache", "djredis": "django-redis"}
        labels = [f"{label} {op}" for op in ("get", "set") for label in names.values()]
        values = [summary["latency"][f"{key} {op}"]["median"] for op in ("get", "set") for key in names]
        bars(
            plt, out("redis-latency.png"), "On one redis-server: cache get and set (median of 3 rounds)",
            labels, values, "µs", ours={label for label in labels if label.startswith("ours")},
        )  # fmt: skip
        rmw = {
            "ours": "clustershm.Lock (FIFO)",
            "redis": "redis-py Lock, sleep=0.1",
            "redis-fast": "redis-py Lock, sleep=0.001",
        }
        bars(
            plt, out("redis-rmw.png"), "On one redis-server: locked read-modify-write, 4 processes",
            list(rmw.values()), [summary["rmw"][key]["median"] for key in rmw], "operations/s",
            ours={rmw["ours"]},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
