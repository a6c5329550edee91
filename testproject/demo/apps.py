from django.apps import AppConfig

#: A module the reload tests write and change (None when it is absent).
probe = None


class DemoConfig(AppConfig):
    name = "testproject.demo"
    label = "demo"

    def ready(self):
        # Under runcluster this runs in each worker as it loads the project
        # (after the fork: a SIGHUP loads new code), and once before any
        # worker, in the start-up child. Keep it idempotent; once-per-start
        # state goes in CLUSTERSHM["ON_START"] (startup.py).
        #
        # Feature flags kept in sync in every worker by a listener: live in
        # each worker before it serves its first request.
        from testproject.demo import flags

        flags.start()

        global probe
        try:
            import demo_code_probe as probe
        except ImportError:
            probe = None
