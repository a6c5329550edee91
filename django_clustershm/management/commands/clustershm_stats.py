"""``manage.py clustershm_stats``: the Manager's figures, for people and scripts."""

import json

from django.core.management.base import BaseCommand, CommandError

from django_clustershm.exceptions import ClusterShmError
from django_clustershm.registry import connect, get_client


class Command(BaseCommand):
    help = "Show the Manager's statistics (keys, bytes, hits, ops/s, connected workers)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--address", help="socket of a running cluster (default: from settings or CLUSTERSHM_ADDRESS)"
        )
        parser.add_argument("--json", action="store_true", dest="as_json", help="print JSON")

    def handle(self, *args, address=None, as_json=False, **options):
        try:
            client = connect(address) if address else get_client()
            stats = client.stats()
        except ClusterShmError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(stats, indent=2, sort_keys=True))
            return
        store = stats["store"]
        self.stdout.write(
            f"Manager pid {stats['manager_pid']}, up {stats['uptime']:.0f}s, "
            f"{stats['ops']} ops ({stats['ops_per_second']}/s)"
        )
        self.stdout.write(
            f"store: {store['keys']} keys, {store['bytes']} bytes, "
            f"{store['hits']} hits, {store['misses']} misses, {store['expired']} expired"
        )
        self.stdout.write(f"clients: {len(stats['clients'])}")
        for c in stats["clients"]:
            self.stdout.write(f"  pid {c['pid']}: {c['ops']} ops")
