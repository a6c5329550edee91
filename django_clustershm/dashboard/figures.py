"""The dashboard's figures: one plain dict built from ``stats()``, for the page, its JSON and the metrics.

:func:`collect` asks the engine once (``client.stats()``, plus this process's
``near_stats()``) and :func:`build` turns the answer into what an operator
reads: processes rather than connections, namespaces with their fill and hit
rate, locks with their queues, the ops history. Everything else (the HTML,
the JSON endpoint, the Prometheus collector) renders this one dict, so the
three cannot disagree.

On the Redis engine ``stats()`` carries the server's INFO figures and the
lock queues, and nothing per process or per namespace beyond the store's key
count: what it does not say is left out (None, or an empty list), and
``engine_kind`` tells the template which panels have something to show.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..client.client import Client

#: Current lock waits listed on the page, longest first (the Manager lists at most 100 held locks).
LONGEST_CURRENT_WAITS = 5


def collect(client: Client) -> dict[str, Any]:
    """Ask the engine behind ``client`` once, and build the figures."""
    return build(client.stats(), client.near_stats(), here=os.getpid(), now=time.time())


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (Linux /proc), or None if it is gone or not ours to see."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _rate(hits: int | None, misses: int | None) -> float | None:
    if hits is None or misses is None or hits + misses == 0:
        return None
    return hits / (hits + misses)


def _fill(used: int | None, budget: int | None) -> float | None:
    if used is None or not budget:
        return None
    return min(used / budget, 1.0)


def _processes(stats: dict, here: int, now: float) -> list[dict]:
    """One row per process: its connections summed (a worker holds one per
    thread, plus its listener and near-cache channels)."""
    manager_pid = stats.get("manager_pid")
    by_pid: dict[int, dict] = {}
    for client in stats.get("clients", ()):
        pid = client["pid"]
        row = by_pid.get(pid)
        if row is None:
            row = by_pid[pid] = {
                "pid": pid,
                "connections": 0,
                "since": client["since"],
                "ops": 0,
                "listeners": 0,
                "near": False,
            }
        row["connections"] += 1
        row["since"] = min(row["since"], client["since"])
        row["ops"] += client["ops"]
    for pid, count in stats.get("listeners", {}).get("by_pid", {}).items():
        row = by_pid.get(int(pid))
        if row is not None:
            row["listeners"] = count
    for pid in stats.get("near", {}).get("processes", ()):
        row = by_pid.get(pid)
        if row is not None:
            row["near"] = True  # reads through near caches (the Manager keeps nothing else per process)
    rows = sorted(by_pid.values(), key=lambda row: row["since"])
    for row in rows:
        pid = row["pid"]
        if pid == manager_pid:
            # The master under runcluster (its start-up hook, its own listeners),
            # or this very process when the Manager is embedded.
            row["role"] = "manager"
        elif manager_pid is not None and _parent_pid(pid) == manager_pid:
            row["role"] = "worker"
        else:
            row["role"] = "process"  # attached from outside: a management command, a cron job
        row["this"] = pid == here
        row["up"] = max(now - row["since"], 0.0)
    return rows


def _namespaces(stats: dict) -> list[dict]:
    rows = []
    store = stats.get("store", {})
    spaces = [("", "store", store)] + [(name, "cache", c) for name, c in sorted(stats.get("caches", {}).items())]
    for name, kind, space in spaces:
        budget = space.get("max_bytes")
        rows.append(
            {
                "name": name,
                "label": name if kind == "cache" else "shared store",
                "kind": kind,
                "keys": space.get("keys"),
                "bytes": space.get("bytes"),
                "max_bytes": budget,
                "fill": _fill(space.get("bytes"), budget),
                "hits": space.get("hits"),
                "misses": space.get("misses"),
                "hit_rate": _rate(space.get("hits"), space.get("misses")),
                "evictions": space.get("evictions", 0 if kind == "cache" else None),
                "expired": space.get("expired"),
            }
        )
    return rows


def _locks(stats: dict) -> dict:
    locks = stats.get("locks", {})
    held = []
    current_waits = []
    for lock in locks.get("held", ()):
        waited = lock.get("waited") or [None] * len(lock.get("waiters", ()))
        waiters = [{"pid": pid, "waited": w} for pid, w in zip(lock.get("waiters", ()), waited, strict=False)]
        held.append(
            {
                "key": lock["key"],
                "pid": lock.get("pid"),
                "fence": lock.get("fence"),
                "held_for": lock.get("held_for"),
                "lease_left": lock.get("lease_left"),
                "waiters": waiters,
            }
        )
        for position, waiter in enumerate(waiters, 1):
            if waiter["waited"] is not None:
                current_waits.append({"key": lock["key"], "position": position, **waiter})
    current_waits.sort(key=lambda w: w["waited"], reverse=True)
    return {
        "held_count": locks.get("held_count", len(held)),
        "waiting": locks.get("waiting", 0),
        "granted": locks.get("granted"),
        "timed_out": locks.get("timed_out"),
        "expired_leases": locks.get("expired_leases"),
        "held": held,
        "listed": len(held),
        "current_waits": current_waits[:LONGEST_CURRENT_WAITS],
        "longest_waits": list(locks.get("longest_waits", ())),
    }


def _history(stats: dict) -> dict | None:
    history = stats.get("ops_history")
    if not history:
        return None
    ops = list(history.get("ops", ()))
    return {
        "end": history["end"],
        "ops": ops,
        "seconds": len(ops),
        "peak": max(ops, default=0),
        "mean": sum(ops) / len(ops) if ops else 0.0,
    }


def build(stats: dict, near: dict, *, here: int, now: float) -> dict[str, Any]:
    """The figures, from a ``stats()`` answer and this process's ``near_stats()``."""
    capabilities = dict(stats.get("capabilities", {}))
    engine = capabilities.get("engine", stats.get("engine", "local"))
    local = "manager_pid" in stats
    processes = _processes(stats, here, now) if local else []
    listeners = stats.get("listeners", {})
    loop = stats.get("loop") or {}
    server = stats.get("server") if not local else None
    return {
        "at": now,
        "engine": engine,
        "engine_kind": "manager" if local else "remote",
        "capabilities": capabilities,
        "served_by": here,
        "manager": (
            {
                "pid": stats["manager_pid"],
                "uptime": stats.get("uptime"),
                "ops": stats.get("ops"),
                "ops_per_second": stats.get("ops_per_second"),
                "connections": loop.get("connections", len(stats.get("clients", ()))),
                "max_stall_ms": loop.get("max_stall_ms"),
                "recent_max_stall_ms": loop.get("recent_max_stall_ms"),
                "output_bytes": loop.get("output_bytes"),
                "max_total_output": loop.get("max_total_output"),
                "snapshot": stats.get("snapshot"),
            }
            if local
            else None
        ),
        "remote": (
            {
                "address": stats.get("address"),
                "key_prefix": stats.get("key_prefix"),
                "ops": stats.get("ops"),
                **(server or {}),
                "hit_rate": _rate((server or {}).get("keyspace_hits"), (server or {}).get("keyspace_misses")),
                "memory_fill": _fill((server or {}).get("used_memory"), (server or {}).get("maxmemory")),
            }
            if not local
            else None
        ),
        "processes": processes,
        "workers": sum(1 for p in processes if p["role"] == "worker"),
        "namespaces": _namespaces(stats),
        "history": _history(stats),
        "locks": _locks(stats),
        "listeners": {
            "subscriptions": listeners.get("subscriptions"),
            "pushed": listeners.get("pushed"),
            "processes": len(listeners.get("by_pid", {})),
        },
        "near": {
            # Keys read by near-cache misses, all processes (None: not a Manager).
            "fills": stats.get("near", {}).get("fills"),
            # Value slots in use, and changes written into them (see server/stamps.py).
            "slots": stats.get("near", {}).get("slots"),
            "slot_writes": stats.get("near", {}).get("slot_writes"),
            # This process's own near caches (a process knows only its own hits).
            "here": [
                {
                    "namespace": ns,
                    "label": ns or "shared store",
                    **figures,
                    "hit_rate": _rate(figures["hits"], figures["misses"]),
                }
                for ns, figures in sorted(near.items())
            ],
        },
    }
