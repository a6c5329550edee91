"""Big values (#19 part 4): get and set of 1, 4 and 16 MiB through the Manager against redis-py on redis-server.

One process, sequential calls, the same bytes value pickled on both sides (our client pickles every value it
stores; the redis-py rows call ``pickle.dumps``/``pickle.loads`` around ``SET``/``GET`` so that both do the same
work; a row without the pickle shows what it costs). Every system runs ``--n`` gets and sets per size per round,
the systems in turn (rotated each round), over ``--rounds`` rounds: the table gives the median round's median,
its spread over the rounds, the cost per MiB and the ratio to redis-py's. The ``cache`` row is a Django
``ClusterShmCache`` alias with its defaults (a near cache in front, as every Django user has it). Target: at most
1.0x redis-py for get and set at every size, and the cost per MiB flat in size.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from types import SimpleNamespace

import lab
from lab import clustershm

MIB = 1 << 20
SYSTEMS = {"clustershm": "clustershm client (sync)", "aio": "clustershm client (asyncio)",
           "cache": "ClusterShmCache (defaults: near cache)",
           "redis": "redis-py + pickle", "redis-raw": "redis-py, raw bytes (no pickle)"}  # fmt: skip
REFERENCE = "redis"


class Ours:
    def __init__(self, bench: lab.Lab) -> None:
        self.client = clustershm.connect(bench.address, bench.secret)
        bench.cleanups.append(self.client.close)

    def run(self, key: str, value: bytes, n: int) -> tuple[list, list]:
        get, set_, clock = self.client.get, self.client.set, time.perf_counter
        sets, gets = [], []
        for _ in range(n):
            t0 = clock()
            set_(key, value)
            t1 = clock()
            got = get(key)
            t2 = clock()
            sets.append(t1 - t0)
            gets.append(t2 - t1)
            if len(got) != len(value):
                raise lab.BenchError(f"clustershm returned {len(got)} bytes for a value of {len(value)}")
        return sets, gets


class OursAsync(Ours):
    def run(self, key: str, value: bytes, n: int) -> tuple[list, list]:
        aio = self.client.aio

        async def body():
            sets, gets, clock = [], [], time.perf_counter
            await aio.aping()  # this loop's connection, before anything is timed
            for _ in range(n):
                t0 = clock()
                await aio.aset(key, value)
                t1 = clock()
                got = await aio.aget(key)
                t2 = clock()
                sets.append(t1 - t0)
                gets.append(t2 - t1)
                if len(got) != len(value):
                    raise lab.BenchError(f"clustershm.aio returned {len(got)} bytes for a value of {len(value)}")
            await aio.aclose()
            return sets, gets

        return asyncio.run(body())


class OursCache(Ours):
    """A Django ``ClusterShmCache`` alias with its defaults, as a Django user calls it: in cluster mode it
    reads through a near cache (a near cache's miss is a TRACK_GET, whose reply carries the value in an
    array, not alone as a GET's does). ``clustershm``'s client, made by ``connect()``, has none."""

    def __init__(self, bench: lab.Lab) -> None:
        import django
        from django.conf import settings

        settings.configure(DEBUG=False, SECRET_KEY="bench-big-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                           CACHES={"default": {"BACKEND": "django_clustershm.cache.ClusterShmCache",
                                               "LOCATION": "bench-big"}})  # fmt: skip
        django.setup()
        from django.core.cache import caches

        cache = caches["default"]
        self.client = SimpleNamespace(get=cache.get, set=lambda key, value: cache.set(key, value, None))


class Redis:
    def __init__(self, bench: lab.Lab, path: str, pickled: bool = True) -> None:
        import redis

        self.r = redis.Redis(unix_socket_path=path)
        self.pickled = pickled
        bench.cleanups.append(self.r.close)

    def run(self, key: str, value: bytes, n: int) -> tuple[list, list]:
        rget, rset, clock, dumps, loads = self.r.get, self.r.set, time.perf_counter, pickle.dumps, pickle.loads
        protocol = pickle.HIGHEST_PROTOCOL
        sets, gets = [], []
        for _ in range(n):
            if self.pickled:
                t0 = clock()
                rset(key, dumps(value, protocol))
                t1 = clock()
                got = loads(rget(key))
                t2 = clock()
            else:
                t0 = clock()
                rset(key, value)
                t1 = clock()
                got = rget(key)
                t2 = clock()
            sets.append(t1 - t0)
            gets.append(t2 - t1)
            if len(got) != len(value):
                raise lab.BenchError(f"redis-py returned {len(got)} bytes for a value of {len(value)}")
        return sets, gets


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 3, "rounds": 1, "sizes": "1,16"}, SYSTEMS,
                       n=(lab.count, 10, "timed gets and sets per size per system per round"),
                       rounds=(lab.count, 3, "rounds"),
                       sizes=(str, None, "value sizes in MiB, comma-separated (default 1,4,16)"))  # fmt: skip
    sizes = [int(s) for s in (args.sizes or "1,4,16").split(",") if s.strip()]
    if REFERENCE in args.selected or "redis-raw" in args.selected:
        lab.need(binaries=["redis-server"], modules=["redis"])
    samples: dict = {name: {size: {"get": [], "set": []} for size in sizes} for name in args.selected}
    with lab.Lab("big") as bench:
        systems = {}
        if {"clustershm", "aio", "cache"} & set(args.selected):
            bench.start_manager(configure="cache" in args.selected)  # (the cache alias uses this process's client)
        path = bench.start_redis() if {"redis", "redis-raw"} & set(args.selected) else None
        for name in args.selected:
            systems[name] = {"clustershm": Ours, "aio": OursAsync, "cache": OursCache}[name](bench) \
                if name in ("clustershm", "aio", "cache") else Redis(bench, path, pickled=name == "redis")  # fmt: skip
        for size in sizes:  # warm up: the first big transfer of each pays for its buffers
            value = os.urandom(size * MIB)
            for system in systems.values():
                system.run("bench:big", value, 1)
        for r in range(args.rounds):
            order = args.selected[r % len(args.selected) :] + args.selected[: r % len(args.selected)]
            for size in sizes:
                value = os.urandom(size * MIB)
                for name in order:
                    lab.log(f"round {r + 1}/{args.rounds}: {name}, {size} MiB x {args.n}")
                    with lab.gc_paused():
                        sets, gets = systems[name].run("bench:big", value, args.n)
                    samples[name][size]["set"].append(lab.summary(sets, 1e3)["median_us"])  # ms, despite the name
                    samples[name][size]["get"].append(lab.summary(gets, 1e3)["median_us"])
                del value

    results = {name: {str(size): {op: lab.rounds(v) for op, v in ops.items()} for size, ops in per.items()}
               for name, per in samples.items()}  # fmt: skip
    rows, failed_targets = [], []
    ref = results.get(REFERENCE)
    for op in ("get", "set"):
        for size in sizes:
            for name in args.selected:
                fig = results[name][str(size)][op]
                base = ref[str(size)][op]["median"] if ref else None
                rows.append([f"{op} {size} MiB", SYSTEMS[name], f"{fig['median']:.2f}",
                             f"{fig['min']:.2f} - {fig['max']:.2f} ({fig['spread']:.0%})",
                             f"{fig['median'] / size:.2f}", lab.fmt_x(fig["median"], base)])  # fmt: skip
                if name in ("clustershm", "cache") and base and fig["median"] > base:
                    failed_targets.append(f"{op} {size} MiB: {fig['median'] / base:.2f}x redis-py")
    head = lab.header(f"{args.rounds} round(s) of {args.n} gets and sets per size per system; run took "
                      f"{bench.elapsed:.0f}s", bench.versions)  # fmt: skip
    columns = ["operation", "system", "ms (median round's median)", "range over the rounds (spread)", "ms per MiB",
               "x redis-py + pickle"]  # fmt: skip
    verdict = ("- PASS: ours (client and cache) get and set at most 1.0x redis-py at every size" if not failed_targets
               else "- FAIL: ours over redis-py: " + "; ".join(failed_targets))  # fmt: skip
    text = ["## Big values: get and set of 1-16 MiB, one process", head, lab.table(columns, rows, align="llrrrr"),
            "### Target\n\n" + verdict]  # fmt: skip
    headlines = {f"big {op} {size} MiB (ms)": (results["clustershm"][str(size)][op]["median"], "lower")
                 for op in ("get", "set") for size in sizes if "clustershm" in results}  # fmt: skip
    return lab.finish(args, bench, text, {"sizes_mib": sizes, "results": results}, headlines)


if __name__ == "__main__":
    lab.run(main)
