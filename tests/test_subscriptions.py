"""Who listens to what, in the Manager: the pure table of subscriptions, with fake sessions."""

import pytest

from django_clustershm.exceptions import LimitExceeded
from django_clustershm.server.subscriptions import MAX_SUBSCRIPTIONS_PER_SESSION, Subscriptions
from django_clustershm.wire.frames import EVENT_CLEAR, EVENT_EVICT, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH


class Session:
    """What the table uses of an engine session: an id, a pid, and push(event)."""

    def __init__(self, sid: int, pid: int | None = None) -> None:
        self.id = sid
        self.pid = 100 + sid if pid is None else pid
        self.events: list[tuple] = []
        self.push = self.events.append

    def take(self) -> list[tuple]:
        events = list(self.events)
        self.events.clear()
        return events


@pytest.fixture
def subs():
    return Subscriptions()


def test_by_key(subs):
    s = Session(1)
    subs.add(s, 7, "ns", "k", False)
    subs.notify("ns", EVENT_SET, "k", b"v1")
    subs.notify("ns", EVENT_SET, "k2", b"no")  # another key
    subs.notify("ns", EVENT_SET, "kk", b"no")  # a key is not a prefix
    subs.notify("other", EVENT_SET, "k", b"no")  # the same key in another namespace
    subs.notify("ns", EVENT_SET, "k", 2)
    assert s.take() == [(7, "ns", "k", EVENT_SET, b"v1"), (7, "ns", "k", EVENT_SET, 2)]  # in order
    assert subs.pushed == 2


def test_by_prefix(subs):
    s = Session(1)
    subs.add(s, 1, "ns", "user:", True)
    for key in ("user:1", "user:", "use", "x:user:1", "User:1", "user:2"):
        subs.notify("ns", EVENT_SET, key, key.encode())
    subs.notify("other", EVENT_SET, "user:3", b"no")
    assert s.take() == [
        (1, "ns", "user:1", EVENT_SET, b"user:1"),
        (1, "ns", "user:", EVENT_SET, b"user:"),
        (1, "ns", "user:2", EVENT_SET, b"user:2"),
    ]


def test_the_empty_prefix_hears_every_key_of_its_namespace(subs):
    s = Session(1)
    subs.add(s, 1, "", "", True)
    subs.notify("", EVENT_SET, "a", 1)
    subs.notify("", EVENT_REMOVE, "b", None)
    subs.notify("cache", EVENT_SET, "a", 1)
    assert s.take() == [(1, "", "a", EVENT_SET, 1), (1, "", "b", EVENT_REMOVE, None)]


def test_only_a_set_carries_its_value(subs):
    s = Session(1)
    subs.add(s, 1, "ns", "k", False)
    for event in (EVENT_REMOVE, EVENT_EXPIRE, EVENT_EVICT):
        subs.notify("ns", event, "k", b"old value")
    assert s.take() == [(1, "ns", "k", event, None) for event in (EVENT_REMOVE, EVENT_EXPIRE, EVENT_EVICT)]


def test_a_touch_is_not_told(subs):
    s = Session(1)
    subs.add(s, 1, "ns", "k", False)
    subs.add(s, 2, "ns", "", True)
    subs.notify("ns", EVENT_TOUCH, "k", None)
    assert s.take() == [] and subs.pushed == 0


def test_a_clear_reaches_every_subscription_of_the_namespace(subs):
    a, b = Session(1), Session(2)
    subs.add(a, 1, "ns", "k1", False)
    subs.add(a, 2, "ns", "p:", True)
    subs.add(b, 3, "ns", "k2", False)
    subs.add(b, 4, "ns", "k2", False)  # two subscriptions of one key
    subs.add(b, 5, "other", "k1", False)
    subs.add(b, 6, "other", "", True)
    subs.notify("ns", EVENT_CLEAR, None, b"ignored")
    assert sorted(a.take()) == [(1, "ns", None, EVENT_CLEAR, None), (2, "ns", None, EVENT_CLEAR, None)]
    assert sorted(b.take()) == [(3, "ns", None, EVENT_CLEAR, None), (4, "ns", None, EVENT_CLEAR, None)]
    assert subs.pushed == 4


def test_every_matching_subscription_is_told_once(subs):
    a, b = Session(1), Session(2)
    subs.add(a, 1, "ns", "k", False)
    subs.add(a, 2, "ns", "k", True)  # the key as a prefix: matches too
    subs.add(b, 1, "ns", "k", False)  # the same sub_id in another session
    subs.add(b, 3, "ns", "", True)
    subs.notify("ns", EVENT_SET, "k", b"v")
    assert sorted(a.take()) == [(1, "ns", "k", EVENT_SET, b"v"), (2, "ns", "k", EVENT_SET, b"v")]
    assert sorted(b.take()) == [(1, "ns", "k", EVENT_SET, b"v"), (3, "ns", "k", EVENT_SET, b"v")]


def test_remove(subs):
    a, b = Session(1), Session(2)
    subs.add(a, 1, "ns", "k", False)
    subs.add(a, 2, "ns", "p", True)
    subs.add(b, 1, "ns", "k", False)
    assert subs.count == 3
    assert subs.remove(a, 1) is True
    assert subs.remove(a, 1) is False  # already removed
    assert subs.remove(a, 99) is False and subs.remove(Session(9), 1) is False  # never added
    subs.notify("ns", EVENT_SET, "k", 1)
    assert a.take() == [] and b.take() == [(1, "ns", "k", EVENT_SET, 1)]  # b's sub_id 1 is its own
    assert subs.remove(a, 2) is True
    subs.notify("ns", EVENT_SET, "p1", 1)
    assert a.take() == []
    assert subs.remove(b, 1) is True
    assert subs.count == 0
    assert subs._exact == {} and subs._prefixed == {} and subs._lengths == {}  # nothing left behind


def test_adding_a_sub_id_again_replaces_it(subs):
    s = Session(1)
    subs.add(s, 1, "ns", "old", False)
    subs.add(s, 1, "ns", "new:", True)
    assert subs.count == 1
    subs.notify("ns", EVENT_SET, "old", 1)
    subs.notify("ns", EVENT_SET, "new:1", 2)
    assert s.take() == [(1, "ns", "new:1", EVENT_SET, 2)]
    assert subs.describe()["by_pid"] == {str(s.pid): 1}  # still the session's (it was orphaned)
    subs.drop_session(s)
    assert subs.count == 0 and subs.describe()["by_pid"] == {}
    subs.notify("ns", EVENT_SET, "new:1", 3)
    assert s.take() == []


def test_drop_session(subs):
    a, b = Session(1), Session(2)
    subs.add(a, 1, "ns", "k", False)
    subs.add(a, 2, "ns", "", True)
    subs.add(a, 3, "other", "k", False)
    subs.add(b, 1, "ns", "k", False)
    subs.add(b, 2, "ns", "", True)
    subs.drop_session(a)
    assert subs.count == 2
    subs.notify("ns", EVENT_SET, "k", 1)
    subs.notify("other", EVENT_SET, "k", 1)
    assert a.take() == []
    assert sorted(b.take()) == [(1, "ns", "k", EVENT_SET, 1), (2, "ns", "k", EVENT_SET, 1)]
    subs.drop_session(a)  # twice: nothing happens
    subs.drop_session(Session(9))  # never subscribed
    subs.drop_session(b)
    assert subs.count == 0 and subs._exact == {} and subs._prefixed == {} and subs._by_session == {}


def test_subscriptions_per_session_are_bounded(subs):
    a, b = Session(1), Session(2)
    for sub_id in range(MAX_SUBSCRIPTIONS_PER_SESSION):
        subs.add(a, sub_id, "ns", f"k{sub_id}", sub_id % 2 == 0)
    with pytest.raises(LimitExceeded):
        subs.add(a, -1, "ns", "one more", False)
    assert subs.count == MAX_SUBSCRIPTIONS_PER_SESSION
    subs.add(a, 0, "ns", "replaced", False)  # replacing one is not one more
    subs.add(b, 0, "ns", "k", False)  # another session has its own limit
    assert subs.count == MAX_SUBSCRIPTIONS_PER_SESSION + 1
    assert subs.remove(a, 1) is True
    subs.add(a, -1, "ns", "room again", False)
    subs.notify("ns", EVENT_SET, "room again", 1)
    assert a.take() == [(-1, "ns", "room again", EVENT_SET, 1)]


def test_a_session_without_a_push_is_skipped(subs):
    a, b = Session(1), Session(2)
    a.push = None  # its transport has gone, its session not dropped yet
    subs.add(a, 1, "ns", "k", False)
    subs.add(b, 1, "ns", "k", False)
    subs.notify("ns", EVENT_SET, "k", 1)
    subs.notify("ns", EVENT_CLEAR, None, None)
    assert b.take() == [(1, "ns", "k", EVENT_SET, 1), (1, "ns", None, EVENT_CLEAR, None)]
    assert subs.pushed == 2


def test_nothing_is_pushed_without_subscriptions(subs):
    subs.notify("ns", EVENT_SET, "k", 1)
    subs.notify("ns", EVENT_CLEAR, None, None)
    assert subs.pushed == 0


def test_describe(subs):
    a, b = Session(1, pid=500), Session(2, pid=600)
    subs.add(a, 1, "ns", "k", False)
    subs.add(a, 2, "ns", "p", True)
    subs.add(b, 1, "other", "", True)
    subs.notify("ns", EVENT_SET, "k", 1)  # one push (by key)
    subs.notify("ns", EVENT_SET, "p1", 1)  # one push (by prefix)
    assert subs.describe() == {"subscriptions": 3, "pushed": 2, "by_pid": {"500": 2, "600": 1}}
    subs.drop_session(a)
    assert subs.describe() == {"subscriptions": 1, "pushed": 2, "by_pid": {"600": 1}}


def test_a_write_looks_up_prefixes_by_length_never_scanning_them(subs):
    """Thousands of prefix subscriptions: a write visits one dict lookup per
    distinct prefix length (#12: 49k prefixes made writes 182x slower)."""
    sessions = [Session(i) for i in range(1, 5001)]
    for i, session in enumerate(sessions):
        subs.add(session, 1, "", f"user:{i}:", True)
    assert sorted(subs._lengths[""]) == sorted({len(f"user:{i}:") for i in range(5000)})  # 4 lengths
    subs.notify("", EVENT_SET, "user:42:name", b"v")
    assert sessions[42].take() == [(1, "", "user:42:name", EVENT_SET, b"v")]
    assert sum(len(s.events) for s in sessions) == 0
    for session in sessions:  # each removal is O(1), and leaves nothing behind
        subs.drop_session(session)
    assert subs._prefixed == {} and subs._lengths == {} and subs.count == 0
