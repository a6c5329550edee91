"""Start-up code: run once per cluster start, before any worker (``CLUSTERSHM["ON_START"]``)."""

import os

import django_clustershm as clustershm


def on_start():
    # The start-up child's parent is the master: the demo's /booted/ view
    # shows that every worker sees what was stored before it was forked.
    clustershm.set("demo:booted_by", os.getppid())
    clustershm.add("demo:started", 0)
    clustershm.incr("demo:started")  # cluster starts so far (state kept across SIGHUP)
