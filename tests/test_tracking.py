"""Near-cache tracking, the pure table: bounded by (key, tracker) pairs."""

import random

from django_clustershm.server import tracking
from django_clustershm.server.tracking import Tracking
from django_clustershm.wire.frames import EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET


class Tracker:
    """What the table uses of a tracker session."""

    def __init__(self, sid: int, push_limit: int = 1 << 16) -> None:
        self.id = sid
        self.inval_seq = 0
        self.tracked: set = set()
        self.push_limit = push_limit
        self.sent: list = []

    def invalidate(self, op, payload) -> bool:
        self.sent.append((op, payload))
        return True

    def __hash__(self) -> int:
        return self.id


def _recount(table: Tracking) -> int:
    return sum(len(trackers) for trackers in table.records.values())


def test_the_pair_count_stays_exact_through_every_change():
    rng = random.Random(3)
    table = Tracking()
    trackers = [Tracker(i) for i in range(5)]
    for _ in range(5000):
        tracker = rng.choice(trackers)
        ns, key = rng.choice(["", "c"]), f"k{rng.randrange(50)}"
        action = rng.randrange(6)
        if action < 2:
            table.track(tracker, ns, key)
        elif action == 2:
            table.changed(ns, EVENT_SET, key, b"v" * rng.choice([10, 1 << 17]), lambda k: None)
        elif action == 3:
            table.changed(ns, rng.choice([EVENT_REMOVE, EVENT_EXPIRE]), key, None, lambda k: None)
        elif action == 4:
            table.untrack(tracker, ns, key, tracker.inval_seq + 1)
        elif rng.random() < 0.05:
            table.changed(ns, EVENT_SET, None, None, lambda k: None)  # clear
        assert table.pairs == _recount(table)
    for tracker in trackers:
        table.drop_session(tracker)
    assert table.pairs == 0 and table.records == {}


def test_many_trackers_of_the_same_keys_count_as_pairs(monkeypatch):
    """#12 row 9: 40 trackers x 100k keys passed a cap on keys (+787 MB)."""
    monkeypatch.setattr(tracking, "MAX_TRACKED", 100)
    table = Tracking()
    trackers = [Tracker(i) for i in range(4)]
    for tracker in trackers:
        for i in range(50):
            table.track(tracker, "", f"k{i}")
    assert table.pairs == 100 and len(table.records) == 50  # two trackers' worth, not four
    assert not table.track(trackers[3], "", "k0")  # the table is full: answered untracked


def test_one_tracker_holds_a_bounded_number_of_pairs(monkeypatch):
    monkeypatch.setattr(tracking, "MAX_TRACKED_PER_TRACKER", 10)
    table = Tracking()
    greedy, other = Tracker(1), Tracker(2)
    assert all(table.track(greedy, "", f"k{i}") for i in range(10))
    assert not table.track(greedy, "", "k10")
    assert table.track(greedy, "", "k3")  # one it holds already: read again, still tracked
    assert table.track(other, "", "k10")
