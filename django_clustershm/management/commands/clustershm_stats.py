"""``manage.py clustershm_stats``: the Manager's figures, for people and scripts.

Without ``--address`` it reports the project's running cluster (found through
its runtime file: see :mod:`django_clustershm.registry`); with none running,
it says so on stderr and reports this process's own embedded Manager.

The text report has one section per thing an operator decides on, in the
order ``top`` puts them: who serves (the engine, the worker processes), what
is stored (the store, each cache: keys, bytes against the budget, hit rate,
evictions), what waits (locks held, their holders, lease left and queue) and
who listens. ``--watch`` redraws it every few seconds in place (on a
terminal) until Ctrl-C; ``--json`` prints the raw figures for scripts.
"""

from __future__ import annotations

import json
import os
import time

from django.core.management.base import BaseCommand, CommandError

from django_clustershm import registry
from django_clustershm.exceptions import ClusterShmError

#: ANSI: cursor home, then clear the screen (what ``top`` and ``watch`` draw with).
CLEAR = "\x1b[H\x1b[2J"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _bytes(value) -> str:
    if value is None:
        return "?"
    value = int(value)
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _hit_rate(hits: int, misses: int) -> str:
    reads = hits + misses
    return "-" if not reads else f"{100 * hits / reads:.1f}%"


def render(stats: dict, out, self_pid: int | None = None) -> None:
    """Write the text report of ``stats`` (a ``Client.stats()`` answer) with ``out(line)``.

    ``self_pid``: the reporting process, whose own connection is not a worker's."""
    if "manager_pid" not in stats:  # a remote engine (Redis, Valkey): its own figures
        _render_remote(stats, out)
        return
    store = stats["store"]
    engine = stats.get("capabilities", {}).get("engine", "local")
    where = ", embedded in this process" if stats["manager_pid"] == self_pid else ""
    out(
        f"{engine} engine: Manager pid {stats['manager_pid']}{where}, up {_duration(stats['uptime'])}, "
        f"{stats['ops']} ops ({stats['ops_per_second']}/s)"
    )
    clients = stats.get("clients", [])
    # Workers are processes, not connections: a worker holds one per thread, plus
    # its listener and near-cache channels. The master (the Manager's own process)
    # and this command are not workers.
    others = {stats["manager_pid"], self_pid}
    workers = sorted({c["pid"] for c in clients if c["pid"] not in others})
    line = f"processes: {_plural(len(workers), 'process', 'processes')} connected"
    if workers:
        line += " (pids " + ", ".join(map(str, workers)) + ")"
    line += f", {_plural(len(clients), 'connection')} in all"
    if self_pid is not None and self_pid != stats["manager_pid"] and any(c["pid"] == self_pid for c in clients):
        line += f" (this command's included, pid {self_pid})"
    out(line)
    out(
        f"store: {_plural(store['keys'], 'key')}, {_bytes(store['bytes'])} of {_bytes(store.get('max_bytes'))}, "
        f"{store['hits']} hits, {store['misses']} misses ({_hit_rate(store['hits'], store['misses'])} hit rate), "
        f"{store['expired']} expired"
    )
    caches = stats.get("caches", {})
    out(f"caches: {len(caches)}")
    for name, c in sorted(caches.items()):
        out(
            f"  {name}: {_plural(c['keys'], 'key')}, {_bytes(c['bytes'])} of {_bytes(c['max_bytes'])}, "
            f"{c['hits']} hits, {c['misses']} misses ({_hit_rate(c['hits'], c['misses'])} hit rate), "
            f"{c['evictions']} evictions, {c['expired']} expired"
        )
    _render_locks(stats.get("locks", {}), out)
    listeners = stats.get("listeners", {})
    by_pid = listeners.get("by_pid", {})
    out(
        f"listeners: {_plural(listeners.get('subscriptions', 0), 'subscription')} in "
        f"{_plural(len(by_pid), 'process', 'processes')}, {listeners.get('pushed', 0)} events pushed"
    )
    for pid, count in sorted(by_pid.items(), key=lambda item: int(item[0])):
        out(f"  pid {pid}: {_plural(count, 'subscription')}")
    out(f"clients: {len(clients)}")
    for c in clients:
        out(f"  pid {c['pid']}: {c['ops']} ops")


def _render_locks(locks: dict, out) -> None:
    held_count = locks.get("held_count", 0)
    line = f"locks: {held_count} held, {locks.get('waiting', 0)} waiting"
    if "granted" in locks:
        line += (
            f" ({locks.get('granted', 0)} granted, {locks.get('timed_out', 0)} timed out, "
            f"{locks.get('expired_leases', 0)} leases expired)"
        )
    out(line)
    shown = locks.get("held", [])
    for held in shown:
        if "pid" not in held:  # the Redis engine knows the key only
            out(f"  {held['key']}")
            continue
        waiters = ", ".join(str(pid) for pid in held["waiters"]) or "none"
        out(
            f"  {held['key']}: pid {held['pid']}, fence {held['fence']}, held {_seconds(held['held_for'])}, "
            f"lease left {_seconds(held['lease_left'])}, waiting pids: {waiters}"
        )
    if held_count > len(shown):
        out(f"  ... and {held_count - len(shown)} more")


def _render_remote(stats: dict, out) -> None:
    server = stats.get("server", {})
    out(f"{stats['engine']} engine at {stats['address']} (key prefix {stats['key_prefix']!r})")
    out(
        f"server: version {server.get('version')}, {_bytes(server.get('used_memory'))} used "
        f"(maxmemory {server.get('maxmemory')}, {server.get('maxmemory_policy')}), "
        f"{server.get('ops_per_second')} ops/s, {server.get('connected_clients')} clients, "
        f"{_hit_rate(server.get('keyspace_hits') or 0, server.get('keyspace_misses') or 0)} keyspace hit rate"
    )
    out(f"store: {_plural(stats['store']['keys'], 'key')}")
    caches = stats.get("caches")
    if caches is not None:
        out(f"caches: {len(caches)}")
        for name, c in sorted(caches.items()):
            out(f"  {name}: {_plural(c['keys'], 'key')}")
    _render_locks(stats.get("locks", {}), out)
    listeners = stats.get("listeners")
    if listeners is not None:
        heard = listeners.get("namespaces", [])
        out(f"listeners: {_plural(len(heard), 'namespace')} listened to")
        for ns in heard:
            out(f"  {'(store)' if ns == '' else ns}")
    out("guarantees:")
    for name, value in stats.get("capabilities", {}).items():
        out(f"  {name.replace('_', ' ')}: {value}")


def remote_namespaces(client, stats: dict) -> None:
    """Add ``caches`` and ``listeners`` to a remote engine's ``stats`` (in place).

    The Redis engine's ``stats()`` reports the store and the locks only. Every
    namespace keeps an index sorted set ``{PREFIX|NAME}#i`` and, while some
    process listens to it, a presence key ``{PREFIX|NAME}#l`` (see
    ``redisengine/scripts.py`` and ``events.py``): one SCAN for each finds
    them, and the engine's own COUNT script counts a cache's live keys.
    Best effort: a transport without ``run`` (another engine) is left as is.
    """
    transport = client.transport
    ops = getattr(transport, "ops", None)
    if ops is None or not hasattr(transport, "run"):
        return
    from django_clustershm.redisengine.ops import KEYSCAN

    head = "{" + stats["key_prefix"] + "|"

    def names(suffix: str):
        found = yield KEYSCAN, (head + "*}" + suffix).encode()
        return sorted({(k.decode() if isinstance(k, bytes) else k)[len(head) : -len("}" + suffix)] for k in found})

    caches = {}
    for name in transport.run(names("#i")):
        if name:  # "" is the store, reported already
            caches[name] = {"keys": transport.run(ops.count(name))}
    stats["caches"] = caches
    stats["listeners"] = {"namespaces": transport.run(names("#l"))}


class Command(BaseCommand):
    help = "Show the Manager's statistics: store, caches, locks, listeners and connected processes."

    def add_arguments(self, parser):
        parser.add_argument(
            "--address",
            help="socket of a running cluster (default: CLUSTERSHM ADDRESS, CLUSTERSHM_ADDRESS, "
            "or the project's running cluster)",
        )
        parser.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
        parser.add_argument(
            "--watch",
            nargs="?",
            type=float,
            const=2.0,
            default=None,
            metavar="SECONDS",
            help="redraw every SECONDS (default 2) until Ctrl-C, in place on a terminal",
        )
        parser.add_argument(
            "--iterations",
            type=int,
            default=None,
            metavar="N",
            help="with --watch: stop after N reports (default: until Ctrl-C)",
        )

    def handle(self, *args, address=None, as_json=False, watch=None, iterations=None, **options):
        if watch is not None and watch <= 0:
            raise CommandError("--watch takes a number of seconds greater than 0.")
        if iterations is not None and iterations < 1:
            raise CommandError("--iterations takes a number greater than 0.")
        try:
            client = registry.connect(address) if address else registry.get_client()
            if not address and registry.mode() == "embedded" and not registry.auto_attaches():
                self.stderr.write(registry.NO_CLUSTER)  # else the registry said it already
        except ClusterShmError as exc:
            raise CommandError(str(exc)) from exc
        if watch is None:
            self.stdout.write(self._report(client, as_json))
            return
        # The frames go to the real stream (self.stdout's ``write`` adds a newline
        # per call and its isatty() is the stream's own).
        stream = self.stdout
        on_tty = stream.isatty()
        shown = 0
        try:
            while True:
                frame = self._report(client, as_json)
                header = f"clustershm_stats --watch {watch:g}s: {time.strftime('%Y-%m-%d %H:%M:%S')}"
                if on_tty:
                    stream.write(f"{CLEAR}{header}\n\n{frame}", ending="\n")
                else:  # a pipe or a file: frames one after another, nothing to clear
                    stream.write(f"{'' if not shown else chr(10)}--- {header}\n{frame}")
                stream.flush()
                shown += 1
                if iterations is not None and shown >= iterations:
                    return
                time.sleep(watch)
        except KeyboardInterrupt:
            # Ctrl-C is how one leaves a watch: a clean exit, status 0, no traceback.
            stream.write("")
            return

    def _report(self, client, as_json: bool) -> str:
        try:
            stats = client.stats()
            if "manager_pid" not in stats:
                remote_namespaces(client, stats)
        except ClusterShmError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            return json.dumps(stats, indent=2, sort_keys=True)
        lines: list[str] = []
        render(stats, lines.append, os.getpid())
        return "\n".join(lines)
