"""The live dashboard and the Prometheus metrics (#18): the Manager's figures they read,
the views' access rules, and that what they show is what ``stats()`` says.

The real-browser test against a running cluster is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import os

import pytest

from django_clustershm.server.engine import HISTORY_SECONDS, Engine
from django_clustershm.wire import frames as F


class Clock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the Manager's figures -----------------------------------------------------------------------


def test_ops_history_counts_each_second_and_idle_seconds_as_zero():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    session = engine.open_session(pid=7)
    for _ in range(3):
        engine.dispatch(session, F.PING, [])
    clock.now = 1001.2
    engine.tick()  # second 1000 ended: 3 ops
    engine.dispatch(session, F.PING, [])
    clock.now = 1004.5  # no tick in seconds 1002 and 1003 (an idle embedded engine)
    history = engine.dispatch(session, F.STATS, [])["ops_history"]
    assert history["ops"] == [3, 1, 0, 0]
    assert engine.ops_per_second == 0  # the last whole second (1003) had none


def test_ops_history_is_bounded_however_long_the_manager_runs_or_sleeps():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    session = engine.open_session()
    for second in range(2 * HISTORY_SECONDS):
        engine.dispatch(session, F.PING, [])
        clock.now = 1000.0 + second + 1
        engine.tick()
    ops = engine.dispatch(session, F.STATS, [])["ops_history"]["ops"]
    assert len(ops) == HISTORY_SECONDS and set(ops) == {1}
    clock.now += 10**9  # a billion idle seconds: still HISTORY_SECONDS entries, made at once
    engine.tick()
    ops = engine.dispatch(session, F.STATS, [])["ops_history"]["ops"]
    assert len(ops) == HISTORY_SECONDS and ops[-1] == 0


def test_lock_figures_list_waits_in_order_and_the_longest_waits():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    holder, first, second = (engine.open_session(pid=pid) for pid in (10, 20, 30))
    token, _fence = engine.dispatch(holder, F.LOCK_ACQUIRE, ["k", None, None], 1)
    engine.dispatch(first, F.LOCK_ACQUIRE, ["k", None, None], 2)
    clock.now += 2.0
    engine.dispatch(second, F.LOCK_ACQUIRE, ["k", None, None], 3)
    clock.now += 1.0
    [held] = engine.dispatch(holder, F.STATS, [])["locks"]["held"]
    assert (held["waiters"], held["waited"]) == ([20, 30], [3.0, 1.0])
    engine.dispatch(holder, F.LOCK_RELEASE, ["k", token])  # to 20, after 3 s
    longest = engine.dispatch(holder, F.STATS, [])["locks"]["longest_waits"]
    assert [(w["key"], w["pid"], w["waited"], w["granted"]) for w in longest] == [("k", 20, 3.0, True)]


def test_trackers_are_listed_per_process():
    engine = Engine(clock=Clock())
    tracker, reader = engine.open_session(pid=42), engine.open_session(pid=42)
    engine.dispatch(tracker, F.TRACKER, [1024])
    tracker.invalidate = lambda op, payload: True  # what the Manager sets: the push went out
    engine.dispatch(reader, F.SET, ["", "k", b"v", None])
    engine.dispatch(reader, F.TRACK_GET, ["", "k", tracker.id])
    engine.dispatch(reader, F.SET, ["", "k", b"w", None])  # pushed to the tracker (no transport: not sent)
    assert engine.dispatch(reader, F.STATS, [])["trackers"] == [{"pid": 42, "tracked": 1, "pushed": 1}]
