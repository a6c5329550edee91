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
        self.tracked: dict = {}
        self.tracked_count = 0
        self.push_limit = push_limit
        self.sent: list = []

    def invalidate(self, op, payload) -> bool:
        self.sent.append((op, payload))
        return True

    def __hash__(self) -> int:
        return self.id


def _recount(table: Tracking) -> int:
    return sum(len(table.trackers_of(ns, key)) for ns, keys in table.records.items() for key in keys)


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
    assert table.pairs == 0
    while table.sweep(7):
        pass
    assert table.records == {}


def test_many_trackers_of_the_same_keys_count_as_pairs(monkeypatch):
    """#12 row 9: 40 trackers x 100k keys passed a cap on keys (+787 MB)."""
    monkeypatch.setattr(tracking, "MAX_TRACKED", 100)
    table = Tracking()
    trackers = [Tracker(i) for i in range(4)]
    for tracker in trackers:
        for i in range(50):
            table.track(tracker, "", f"k{i}")
    assert table.pairs == 100 and len(table) == 50  # two trackers' worth, not four
    assert not table.track(trackers[3], "", "k0")  # the table is full: answered untracked


def test_one_tracker_holds_a_bounded_number_of_pairs(monkeypatch):
    monkeypatch.setattr(tracking, "MAX_TRACKED_PER_TRACKER", 10)
    table = Tracking()
    greedy, other = Tracker(1), Tracker(2)
    assert all(table.track(greedy, "", f"k{i}") for i in range(10))
    assert not table.track(greedy, "", "k10")
    assert table.track(greedy, "", "k3")  # one it holds already: read again, still tracked
    assert table.track(other, "", "k10")


# -- a closed tracker: counted off at once, its pairs swept a budget at a time (#12, Deliver 3) --


def _live_pairs(table: Tracking) -> int:
    return sum(
        1
        for ns, keys in table.records.items()
        for key in keys
        for sid in table.trackers_of(ns, key)
        if sid in table.trackers
    )


def _records_of(table: Tracking, tracker) -> dict:
    """What the records say ``tracker`` may hold, as its own index keeps it: ns -> {key: None}."""
    found: dict = {}
    for ns, keys in table.records.items():
        for key in keys:
            if tracker.id in table.trackers_of(ns, key):
                found.setdefault(ns, {})[key] = None
    return found


def test_a_closed_tracker_is_sent_nothing_and_counted_off_at_once_then_swept_in_steps(monkeypatch):
    """Dropping a tracker's 65,536 pairs at once took 49 ms of the Manager's
    loop (102 ms with 40 trackers sharing the keys): now the close only counts
    them off, and sweep() removes them ``budget`` at a time."""
    monkeypatch.setattr(tracking, "MAX_TRACKED", 1500)
    table = Tracking()
    gone, other = Tracker(1), Tracker(2)
    for i in range(1000):
        table.track(gone, "", f"k{i}")
    for i in range(500):
        table.track(other, "", f"k{i}")
    assert table.pairs == 1500 and not table.track(other, "", "k999")  # full
    table.drop_session(gone)
    assert gone.tracked is None and table.pairs == 500 == _live_pairs(table)
    assert table.track(other, "", "k999")  # its room is free at once
    table.changed("", EVENT_SET, "k1", b"v", lambda k: None)  # shared: other is updated
    table.changed("", EVENT_REMOVE, "k2", None, lambda k: None)  # shared: other is invalidated
    table.changed("", EVENT_SET, "k600", b"v", lambda k: None)  # gone's only
    assert gone.sent == [] and [p[1] for _, p in other.sent] == ["k1", "k2"]
    assert table.pairs == 500 == _live_pairs(table)  # 501 - k2
    steps = []
    while table.sweeping:
        steps.append(table.sweep(128))
    assert max(steps) <= 128 and sum(steps) <= 1000
    assert table.pairs == 500 == _recount(table)
    assert all(gone.id not in table.trackers_of(ns, key) for ns, keys in table.records.items() for key in keys)
    table.changed("", EVENT_SET, None, None, lambda k: None)  # clear
    assert gone.sent == [] and table.pairs == 0 and table.records == {}


def test_the_pair_count_stays_right_through_closes_and_partial_sweeps():
    rng = random.Random(12)
    table = Tracking()
    trackers = [Tracker(i) for i in range(5)]
    closed: list[Tracker] = []
    next_id = len(trackers)
    for _ in range(8000):
        tracker = rng.choice(trackers)
        ns, key = rng.choice(["", "c"]), f"k{rng.randrange(60)}"
        action = rng.randrange(9)
        if action < 3:
            table.track(tracker, ns, key)
        elif action == 3:
            table.changed(ns, EVENT_SET, key, b"v" * rng.choice([10, 1 << 17]), lambda k: None)
        elif action == 4:
            table.changed(ns, rng.choice([EVENT_REMOVE, EVENT_EXPIRE]), key, None, lambda k: None)
        elif action == 5:
            table.untrack(tracker, ns, key, tracker.inval_seq + 1)
        elif action == 6:
            sent = len(tracker.sent)
            table.drop_session(tracker)
            closed.append(tracker)
            tracker.sent_when_closed = sent
            trackers.remove(tracker)
            trackers.append(Tracker(next_id))
            next_id += 1
        elif action == 7:
            table.sweep(rng.randrange(1, 10))
        elif rng.random() < 0.05:
            table.changed(ns, EVENT_SET, None, None, lambda k: None)  # clear
        assert table.pairs == _live_pairs(table)
        for tracker in trackers:  # each live tracker's own index is its pairs
            assert tracker.tracked == _records_of(table, tracker)
            assert tracker.tracked_count == sum(map(len, tracker.tracked.values()))
    assert closed and all(len(t.sent) == t.sent_when_closed for t in closed)  # nothing after the close
    while table.sweep(3):
        pass
    assert table.pairs == _recount(table) == _live_pairs(table)
    assert not [
        sid
        for ns, keys in table.records.items()
        for key in keys
        for sid in table.trackers_of(ns, key)
        if sid not in table.trackers
    ]
