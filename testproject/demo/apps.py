import os

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "testproject.demo"
    label = "demo"

    def ready(self):
        # Under runcluster this runs once, in the master, before the workers
        # are forked: what it stores is in the Manager every worker sees.
        import django_clustershm as clustershm

        clustershm.add("demo:booted_by", os.getpid())

        # Feature flags kept in sync in every worker by a listener: registered
        # here, in the master, and subscribed again in each worker at fork.
        from testproject.demo import flags

        flags.start()
