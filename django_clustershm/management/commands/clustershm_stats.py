"""``manage.py clustershm_stats``: the Manager's figures, for people and scripts.

Without ``--address`` it reports the project's running cluster (found through
its runtime file: see :mod:`django_clustershm.registry`); with none running,
it says so on stderr and reports this process's own embedded Manager.
"""

import json

from django.core.management.base import BaseCommand, CommandError

from django_clustershm import registry
from django_clustershm.exceptions import ClusterShmError


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}s"


class Command(BaseCommand):
    help = "Show the Manager's statistics: store, caches, locks, listeners and connected processes."

    def add_arguments(self, parser):
        parser.add_argument(
            "--address",
            help="socket of a running cluster (default: CLUSTERSHM ADDRESS, CLUSTERSHM_ADDRESS, "
            "or the project's running cluster)",
        )
        parser.add_argument("--json", action="store_true", dest="as_json", help="print JSON")

    def handle(self, *args, address=None, as_json=False, **options):
        try:
            client = registry.connect(address) if address else registry.get_client()
            if not address and registry.mode() == "embedded" and not registry.auto_attaches():
                self.stderr.write(registry.NO_CLUSTER)  # else the registry said it already
            stats = client.stats()
        except ClusterShmError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(stats, indent=2, sort_keys=True))
            return
        out = self.stdout.write
        if "manager_pid" not in stats:  # a remote engine (Redis, Valkey): its own figures
            self._remote(stats)
            return
        store = stats["store"]
        out(
            f"Manager pid {stats['manager_pid']}, up {stats['uptime']:.0f}s, "
            f"{stats['ops']} ops ({stats['ops_per_second']}/s)"
        )
        out(
            f"store: {store['keys']} keys, {store['bytes']} bytes, "
            f"{store['hits']} hits, {store['misses']} misses, {store['expired']} expired"
        )
        caches = stats.get("caches", {})
        out(f"caches: {len(caches)}")
        for name, c in sorted(caches.items()):
            out(
                f"  {name}: {c['keys']} keys, {c['bytes']} of {c['max_bytes']} bytes, {c['hits']} hits, "
                f"{c['misses']} misses, {c['evictions']} evictions, {c['expired']} expired"
            )
        locks = stats.get("locks", {})
        out(
            f"locks: {locks.get('held_count', 0)} held, {locks.get('waiting', 0)} waiting "
            f"({locks.get('granted', 0)} granted, {locks.get('timed_out', 0)} timed out, "
            f"{locks.get('expired_leases', 0)} leases expired)"
        )
        for held in locks.get("held", []):
            waiters = ", ".join(str(pid) for pid in held["waiters"]) or "none"
            out(
                f"  {held['key']}: pid {held['pid']}, fence {held['fence']}, held {_seconds(held['held_for'])}, "
                f"lease left {_seconds(held['lease_left'])}, waiting pids: {waiters}"
            )
        listeners = stats.get("listeners", {})
        by_pid = listeners.get("by_pid", {})
        out(
            f"listeners: {listeners.get('subscriptions', 0)} subscriptions in {len(by_pid)} processes, "
            f"{listeners.get('pushed', 0)} events pushed"
        )
        for pid, count in sorted(by_pid.items(), key=lambda item: int(item[0])):
            out(f"  pid {pid}: {count} subscriptions")
        out(f"clients: {len(stats['clients'])}")
        for c in stats["clients"]:
            out(f"  pid {c['pid']}: {c['ops']} ops")

    def _remote(self, stats: dict) -> None:
        out = self.stdout.write
        server = stats.get("server", {})
        locks = stats.get("locks", {})
        out(f"{stats['engine']} engine at {stats['address']} (key prefix {stats['key_prefix']!r})")
        out(
            f"server: version {server.get('version')}, {server.get('used_memory')} bytes used "
            f"(maxmemory {server.get('maxmemory')}, {server.get('maxmemory_policy')}), "
            f"{server.get('ops_per_second')} ops/s, {server.get('connected_clients')} clients"
        )
        out(f"store: {stats['store']['keys']} keys")
        out(f"locks: {locks.get('held_count', 0)} held, {locks.get('waiting', 0)} waiting")
        for held in locks.get("held", []):
            out(f"  {held['key']}")
        out("guarantees:")
        for name, value in stats.get("capabilities", {}).items():
            out(f"  {name.replace('_', ' ')}: {value}")
