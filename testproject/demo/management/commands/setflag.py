"""``manage.py setflag NAME VALUE``: change a feature flag in every worker of a running cluster.

Run it as the server's user, in the project's directory: like any management
command it attaches to the project's running cluster by itself (through the
runtime file runcluster records). ``CLUSTERSHM_ADDRESS`` names another one::

    python manage.py setflag checkout on
    CLUSTERSHM_ADDRESS=/tmp/clustershm-xxxx/manager.sock python manage.py setflag checkout on
"""

import json

from django.core.management.base import BaseCommand, CommandError

from django_clustershm.exceptions import ClusterShmError
from testproject.demo import flags


class Command(BaseCommand):
    help = "Set a feature flag (a JSON value, or a plain string) in the cluster's shared store."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("value")

    def handle(self, name, value, **options):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        try:
            flags.set_flag(name, parsed)
        except ClusterShmError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"flags:{name} = {parsed!r}")
