"""Glob patterns and SCAN cursors in the Manager (#17 part 1), on the engine itself.

The matcher is checked against a port of Redis's own ``stringmatchlen`` on
random patterns and keys; the cursor against random writes between its
calls (every key present throughout is returned, exactly once), its bounded
work per call and its bounded state.
"""

from __future__ import annotations

import random
import time

import pytest

from django_clustershm.exceptions import InvalidArgument, InvalidKey, LimitExceeded
from django_clustershm.server import scans as S
from django_clustershm.server.engine import Engine
from django_clustershm.wire import frames as F
from django_clustershm.wire.limits import DEFAULT_BOUNDS

# -- patterns ------------------------------------------------------------------------------


def redis_match(pattern: str, string: str) -> bool:
    """Redis's stringmatchlen (util.c), ported as it is: the reference."""
    p, s = 0, 0
    while p < len(pattern) and s <= len(string):
        c = pattern[p]
        if c == "*":
            while p + 1 < len(pattern) and pattern[p + 1] == "*":
                p += 1
            if p + 1 == len(pattern):
                return True
            return any(redis_match(pattern[p + 1 :], string[i:]) for i in range(s, len(string) + 1))
        if s == len(string):
            return False
        if c == "?":
            s += 1
        elif c == "[":
            p += 1
            negate = p < len(pattern) and pattern[p] == "^"
            if negate:
                p += 1
            matched = False
            while True:
                if p < len(pattern) - 1 and pattern[p] == "\\":
                    p += 1
                    matched |= pattern[p] == string[s]
                elif p < len(pattern) and pattern[p] == "]":
                    break
                elif p >= len(pattern):
                    p -= 1
                    break
                elif len(pattern) - p >= 3 and pattern[p + 1] == "-":
                    low, high = sorted((pattern[p], pattern[p + 2]))
                    p += 2
                    matched |= low <= string[s] <= high
                else:
                    matched |= pattern[p] == string[s]
                p += 1
            if negate:
                matched = not matched
            if not matched:
                return False
            s += 1
        else:
            if c == "\\" and p + 1 < len(pattern):
                p += 1
                c = pattern[p]
            if c != string[s]:
                return False
            s += 1
        p += 1
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern) and s == len(string)


def matches(pattern: str, key: str) -> bool:
    test = S.compile_glob(pattern)
    return True if test is None else bool(test(key))


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("*", ["", "anything", "a\nb"], []),
        ("h?llo", ["hello", "hallo", "h\nllo"], ["hllo", "heello"]),
        ("h*llo", ["hllo", "heeeello"], ["hell", "helloo"]),
        ("h[ae]llo", ["hello", "hallo"], ["hillo"]),
        ("h[^e]llo", ["hallo", "hbllo"], ["hello", "hllo"]),
        ("h[a-b]llo", ["hallo", "hbllo"], ["hcllo"]),
        ("h[b-a]llo", ["hallo", "hbllo"], ["hcllo"]),  # Redis swaps a reversed range
        ("h\\*llo", ["h*llo"], ["hello"]),
        ("[[]1]", ["[1]"], ["1]", "[1"]),
        ("a[*]b", ["a*b"], ["axb"]),
        ("[]", [], ["", "]", "a"]),  # an empty set matches nothing
        ("[^]", ["a", "]"], ["", "ab"]),
        ("[abc", ["a", "c"], ["ab", "d"]),  # unclosed: runs to the end, as in Redis
        ("a\\", ["a\\"], ["a"]),
        ("user:*:cart", ["user:1:cart", "user::cart"], ["user:1:carts", "user:1"]),
        ("*.*", [".", "a.b"], ["ab"]),
        (":1:user:*", [":1:user:", ":1:user:x"], [":2:user:x", "x:1:user:"]),
        ("pre*", ["pre", "prefix"], ["pr", "xpre"]),
        ("exact", ["exact"], ["exac", "exactly"]),
    ],
)
def test_glob_rules_are_redis_rules(pattern, yes, no):
    for key in yes:
        assert matches(pattern, key) and redis_match(pattern, key), (pattern, key)
    for key in no:
        assert not matches(pattern, key) and not redis_match(pattern, key), (pattern, key)


def test_glob_agrees_with_redis_on_random_patterns():
    rng = random.Random(17)
    alphabet = "ab-^]\\[*?x"
    for _ in range(20_000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        key = "".join(rng.choice("ab-^][*?x\\") for _ in range(rng.randint(0, 8)))
        assert matches(pattern, key) == redis_match(pattern, key), (pattern, key)


def test_a_pathological_pattern_costs_linear_time():
    """``a*a*a*...b`` against a long run of ``a``: exponential for a naive
    backtracking matcher (Redis had a CVE for it), linear here."""
    pattern = "a*" * 40 + "b"
    key = "a" * 4000
    test = S.compile_glob(pattern)
    started = time.perf_counter()
    for _ in range(10):
        assert not test(key)
    assert time.perf_counter() - started < 1.0
    assert test("a" * 40 + "b")


# -- scans on the engine -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine():
    return Engine(max_store_bytes=2**30, clock=Clock())


def scan_all(engine, session, ns, pattern="*", count=10, between=None, op=F.SCAN):
    cursor, calls, out = 0, 0, []
    while True:
        cursor, found = engine.dispatch(session, op, [ns, cursor, pattern, count])
        calls += 1
        out.append(found)
        if not cursor:
            return out, calls
        if between is not None:
            between()


@pytest.mark.parametrize("parts", [1, 16], ids=["one-dict", "split"])
@pytest.mark.parametrize("chunk", [S.SNAPSHOT_CHUNK, 256], ids=["copied-at-once", "copied-in-steps"])
@pytest.mark.parametrize("ns", ["", "pages"])
def test_every_key_present_throughout_is_returned_exactly_once(engine, ns, chunk, parts, monkeypatch):
    """Random writes between the calls: removals and additions of other keys,
    re-sets and reads of the stable ones (which reorder a cache's LRU order),
    expiries. Every stable key comes back exactly once; nothing twice. Also
    while the snapshot is copied a chunk at a time, the writes landing in the
    namespace's overlay (and ticks copying chunks between the calls), and on
    a namespace split into parts (#12: past SPLIT_AT keys, lowered here)."""
    monkeypatch.setattr(S, "SNAPSHOT_CHUNK", chunk)
    if parts > 1:
        from django_clustershm.server.namespace import Namespace

        monkeypatch.setattr(Namespace, "SPLIT_AT", 512)
        monkeypatch.setattr(Namespace, "PARTS", parts)
        engine.store._split_at = 512  # made before the patch
    rng = random.Random(ns)
    session = engine.open_session()
    # MAX_ENTRIES and MAX_BYTES large enough that no stable key is culled
    bounds = None if ns == "" else [10**9, DEFAULT_BOUNDS[1], 2**30]
    stable = [f"stable:{i}" for i in range(3000)]
    for key in stable:
        engine.dispatch(session, F.SET, [ns, key, b"v", None, bounds])
    churn = 0

    def write():
        nonlocal churn
        for _ in range(rng.randint(0, 40)):
            action = rng.random()
            if action < 0.4:
                churn += 1
                ttl = rng.choice([None, 0.5, 5.0])
                engine.dispatch(session, F.SET, [ns, f"churn:{churn}", b"c", ttl, bounds])
            elif action < 0.6 and churn:
                engine.dispatch(session, F.REMOVE, [ns, f"churn:{rng.randint(1, churn)}"])
            elif action < 0.8:
                engine.dispatch(session, F.SET, [ns, rng.choice(stable), b"new", None, bounds])
            else:
                engine.dispatch(session, F.GET, [ns, rng.choice(stable)])
        engine.clock.now += rng.choice([0, 0, 0.3])
        if rng.random() < 0.3:
            engine.tick()

    batches, calls = scan_all(engine, session, ns, "*", 7, write)
    seen = [key for batch in batches for key in batch]
    assert len(seen) == len(set(seen)), "a key came back twice"
    assert set(stable) <= set(seen)
    assert all(len(batch) <= 7 for batch in batches)
    assert calls >= 3000 // 7
    assert len(engine.scans) == 0 and engine.scans.refs == 0
    assert len(engine._space(ns).parts) == parts


def test_a_call_looks_at_a_bounded_number_of_keys(engine, monkeypatch):
    """A pattern that matches nothing: each call looks at SCAN_EXAMINE keys and
    returns none, so the scan takes len/SCAN_EXAMINE calls, none of them long."""
    session = engine.open_session()
    for i in range(10_000):
        engine.dispatch(session, F.SET, ["", f"k{i}", b"v", None])
    looked = []
    batch = type(engine.store).scan_batch

    def spy(self, keys, pos, examine, count, match):
        found, end = batch(self, keys, pos, examine, count, match)
        looked.append(end - pos)
        return found, end

    monkeypatch.setattr(type(engine.store), "scan_batch", spy)
    batches, calls = scan_all(engine, session, "", "nothing*", 10)
    assert batches == [[]] * calls
    assert calls == -(-10_000 // S.SCAN_EXAMINE)
    assert max(looked) == S.SCAN_EXAMINE
    # count is capped, whatever a client asks
    looked.clear()
    engine.dispatch(session, F.SCAN, ["", 0, "*", 10**9])
    assert looked == [S.MAX_SCAN_COUNT]


def test_scan_delete_removes_what_matches_and_tells_listeners(engine):
    session = engine.open_session()
    events = []
    session.push = events.append
    engine.dispatch(session, F.LISTEN, [1, "", "user:", True])
    for i in range(3000):
        engine.dispatch(session, F.SET, ["", f"user:{i}", b"v", None])
        engine.dispatch(session, F.SET, ["", f"item:{i}", b"v", None])
    batches, calls = scan_all(engine, session, "", "user:*", 500, op=F.SCAN_DELETE)
    assert sum(batches) == 3000 and calls >= 6
    assert engine.dispatch(session, F.KEYS_MATCH, ["", "user:*"]) == []
    assert len(engine.dispatch(session, F.KEYS_MATCH, ["", "item:*"])) == 3000
    assert len([e for e in events if e[3] == F.EVENT_REMOVE]) == 3000


def test_a_scan_that_ends_in_one_call_keeps_nothing(engine):
    session = engine.open_session()
    engine.dispatch(session, F.SET, ["", "a", b"v", None])
    assert engine.dispatch(session, F.SCAN, ["", 0, "*", 10]) == [0, ["a"]]
    assert engine.dispatch(session, F.SCAN, ["nowhere", 0, "*", 10]) == [0, []]
    assert len(engine.scans) == 0


def test_scan_state_is_bounded_and_freed(engine, monkeypatch):
    one, two = engine.open_session(), engine.open_session()
    for i in range(5000):
        engine.dispatch(one, F.SET, ["", f"k{i}", b"v", None])
    # Per connection: a 17th open scan drops that connection's least recently used.
    cursors = [engine.dispatch(one, F.SCAN, ["", 0, "*", 1])[0] for _ in range(S.SCANS_PER_SESSION)]
    theirs = engine.dispatch(two, F.SCAN, ["", 0, "*", 1])[0]
    engine.dispatch(one, F.SCAN, ["", cursors[0], "*", 1])  # now the most recently used
    engine.dispatch(one, F.SCAN, ["", 0, "*", 1])
    with pytest.raises(InvalidArgument, match="unknown"):
        engine.dispatch(one, F.SCAN, ["", cursors[1], "*", 1])
    engine.dispatch(one, F.SCAN, ["", cursors[0], "*", 1])
    engine.dispatch(two, F.SCAN, ["", theirs, "*", 1])
    assert engine.dispatch(one, F.STATS, [])["scans"]["open"] == S.SCANS_PER_SESSION + 1
    # A cursor goes on with its own namespace and pattern only.
    with pytest.raises(InvalidArgument, match="another"):
        engine.dispatch(one, F.SCAN, ["", cursors[0], "k1*", 1])
    # In all: past MAX_SCAN_REFS, idle scans make room; if they cannot, refused.
    three = engine.open_session()
    monkeypatch.setattr(S, "MAX_SCAN_REFS", engine.scans.refs + 4999)
    with pytest.raises(LimitExceeded):
        engine.dispatch(three, F.SCAN, ["", 0, "*", 1])
    engine.clock.now += S.SCAN_IDLE + 1
    engine.dispatch(two, F.SCAN, ["", theirs, "*", 1])  # in use: kept
    assert engine.dispatch(three, F.SCAN, ["", 0, "*", 1])[0]
    engine.dispatch(two, F.SCAN, ["", theirs, "*", 1])
    assert engine.scans.dropped >= 2
    # A closed connection's scans go with it.
    engine.close_session(one)
    engine.close_session(three)
    assert list(engine.scans.by_session) == [two.id]
    engine.close_session(two)
    assert engine.scans.refs == 0 and len(engine.scans) == 0


def test_the_walked_chunks_of_a_snapshot_are_let_go(engine, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_CHUNK", 5000)
    session = engine.open_session()
    for i in range(20_000):
        engine.dispatch(session, F.SET, ["", f"k{i}", b"v", None])
    cursor, found = engine.dispatch(session, F.SCAN, ["", 0, "*", 5000])
    assert len(found) == 5000 and engine.scans.refs == 15_000  # one chunk copied and walked, 3 to come
    while engine.scans.copying:
        engine.tick()
    assert engine.scans.refs == 15_000  # now counted as held, not estimated
    engine.dispatch(session, F.SCAN, ["", cursor, "*", 5000])
    assert engine.scans.refs == 10_000


def test_bad_scan_arguments_are_refused_and_the_session_stays(engine):
    from django_clustershm.exceptions import ArgumentTypeError

    session = engine.open_session()
    with pytest.raises(InvalidKey):
        engine.dispatch(session, F.SCAN, ["", 0, 5, 10])
    with pytest.raises(InvalidArgument):
        engine.dispatch(session, F.SCAN, ["", 0, "*", 0])
    with pytest.raises(ArgumentTypeError):
        engine.dispatch(session, F.SCAN, ["", "0", "*", 10])
    with pytest.raises(ArgumentTypeError):
        engine.dispatch(session, F.SCAN, [None, 0, "*", 10])
    with pytest.raises(InvalidArgument, match="unknown"):
        engine.dispatch(session, F.SCAN, ["", 12345, "*", 10])
    with pytest.raises(InvalidKey):
        engine.dispatch(session, F.KEYS_MATCH, ["", None])
    assert engine.dispatch(session, F.PING, []) == "pong"


# -- the snapshot is copied in bounded steps (#12) ---------------------------------------------


def test_starting_a_scan_copies_one_chunk_and_each_tick_one_more(engine, monkeypatch):
    """A scan of a million keys copied them all in its first call (15-25 ms of
    the loop). Now the first call copies SNAPSHOT_CHUNK references, and so
    does each tick until the snapshot is complete; meanwhile the namespace
    takes writes and reads as usual."""
    monkeypatch.setattr(S, "SNAPSHOT_CHUNK", 1000)
    session = engine.open_session()
    engine.dispatch(session, F.SET_MANY, ["", [x for i in range(10_500) for x in (f"k{i:05d}", b"v")], None])
    copied = []
    monkeypatch.setattr(S, "tuple", lambda it: copied.append(len(t := tuple(it))) or t, raising=False)
    cursor, found = engine.dispatch(session, F.SCAN, ["", 0, "*", 10])
    assert cursor and len(found) == 10 and copied == [1000]
    assert engine.store.frozen
    engine.dispatch(session, F.SET, ["", "new", b"n", None])  # taken by the overlay
    engine.dispatch(session, F.REMOVE, ["", "k00500"])
    assert (
        engine.dispatch(session, F.GET, ["", "new"]) == b"n" and engine.dispatch(session, F.GET, ["", "k00500"]) is None
    )
    ticks = 0
    while engine.scans.copying:
        engine.tick()
        ticks += 1
    assert copied == [1000] * 10 + [500] and ticks == 10  # 10,500 keys: ten more chunks, the last one short
    assert not engine.store.frozen
    assert engine.dispatch(session, F.GET, ["", "new"]) == b"n" and len(engine.store) == 10_500
    rest = []
    while cursor:
        cursor, found = engine.dispatch(session, F.SCAN, ["", cursor, "*", 1000])
        rest += found
    assert "new" not in rest and "k00500" not in rest  # added after the start; removed before its turn
    assert len(rest) == 10_500 - 10 - 1


def test_a_scan_that_starts_during_anothers_copy_waits_for_it_then_copies_its_own(engine, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_CHUNK", 100)
    one, two = engine.open_session(), engine.open_session()
    engine.dispatch(one, F.SET_MANY, ["", [x for i in range(1000) for x in (f"k{i}", b"v")], None])
    first, mine = engine.dispatch(one, F.SCAN, ["", 0, "*", 10])
    engine.dispatch(one, F.SET, ["", "between", b"v", None])  # after the first scan started, before the second
    second, theirs = engine.dispatch(two, F.SCAN, ["", 0, "*", 10])
    assert second and theirs == []  # waits: its cursor, no keys yet
    assert engine.dispatch(two, F.SCAN, ["", second, "*", 10]) == [second, []]
    while first or second:
        if first:
            first, found = engine.dispatch(one, F.SCAN, ["", first, "*", 37])
            mine += found
        if second:
            second, found = engine.dispatch(two, F.SCAN, ["", second, "*", 37])
            theirs += found
    assert sorted(mine) == sorted(f"k{i}" for i in range(1000))
    assert sorted(theirs) == sorted([f"k{i}" for i in range(1000)] + ["between"])
    assert not engine.scans.copying and not engine.scans.waiting and not engine.store.frozen


def test_a_scan_dropped_during_its_copy_thaws_its_namespace(engine, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_CHUNK", 100)
    one, two = engine.open_session(), engine.open_session()
    engine.dispatch(one, F.SET_MANY, ["", [x for i in range(1000) for x in (f"k{i}", b"v")], None])
    engine.dispatch(one, F.SCAN, ["", 0, "*", 10])
    waiting, _ = engine.dispatch(two, F.SCAN, ["", 0, "*", 10])
    engine.dispatch(one, F.SET, ["", "during", b"v", None])
    engine.close_session(one)  # its copy is given up, and the waiting scan starts its own
    assert engine.store.frozen and [s.cursor for s in engine.scans.copying.values()] == [waiting]
    engine.close_session(two)
    assert not engine.store.frozen and engine.scans.refs == 0 and len(engine.scans) == 0
    assert engine.dispatch(one, F.GET, ["", "during"]) == b"v" and len(engine.store) == 1001


@pytest.mark.parametrize("parts", [1, 8], ids=["one-dict", "split"])
@pytest.mark.parametrize("kind", ["store", "cache"])
def test_a_frozen_namespace_behaves_as_a_plain_one(kind, parts, monkeypatch):
    """The same random operations on two namespaces, one of them frozen and
    thawed at random moments: every answer, the size, the byte count and the
    order (a cache's LRU order: what eviction takes first) stay the same.
    Split into parts (#12), a frozen namespace splits only once thawed, so
    the two may have their keys in other parts: the same entries, then."""
    from django_clustershm.server.namespace import Namespace

    if parts > 1:
        monkeypatch.setattr(Namespace, "SPLIT_AT", 16)
        monkeypatch.setattr(Namespace, "PARTS", parts)
    rng = random.Random(kind)
    clock = Clock()
    make = Namespace.store if kind == "store" else Namespace.cache
    plain, frozen = make(2**30, clock=clock), make(2**30, clock=clock)
    bounds = None if kind == "store" else [400, 3, 2**30]
    keys = [f"k{i}" for i in range(150)]
    split = 0
    for step in range(6000):
        if rng.random() < 0.02:
            if frozen.frozen:
                frozen.thaw()
            else:
                copy = frozen.freeze()
                if len(frozen.parts) == len(plain.parts):
                    assert list(copy) == list(plain.iter_keys())  # the keys of this moment, in order
                else:
                    assert sorted(copy) == sorted(plain.iter_keys())
        key, op = rng.choice(keys), rng.randrange(9)
        ttl = rng.choice([None, None, 1.0, 10.0])
        if op == 7 and rng.random() >= 0.05:
            op = 8  # a clear now and then only
        for space in (plain, frozen):
            if op == 0:
                result = space.set(key, b"v%d" % step, ttl, bounds)
            elif op == 1:
                result = space.add(key, b"a", ttl, bounds)
            elif op == 2:
                result = space.remove(key)
            elif op == 3:
                result = space.get(key)
            elif op == 4:
                result = space.touch(key, ttl)
            elif op == 5:
                result = space.incr(key, 1, 0, bounds) if space.get(key) is None or type(space.get(key)) is int else 0
            elif op == 6:
                result = space.reap()
            elif op == 7:
                result = space.clear()
            else:
                result = space.has(key)
            if space is plain:
                expected = result
        assert result == expected, (step, op, key)
        assert len(frozen) == len(plain) and frozen.bytes == plain.bytes and frozen.timed == plain.timed
        if len(frozen.parts) == len(plain.parts):
            assert list(frozen.iter_keys()) == list(plain.iter_keys())
            assert list(frozen.entries()) == list(plain.entries())
        else:
            assert dict(frozen.entries()) == dict(plain.entries())
        split += len(plain.parts) > 1
        clock.now += rng.choice([0, 0, 0.4])
    frozen.thaw()
    assert not frozen.frozen and all(type(part) is dict for part in frozen.parts)
    assert dict(frozen.entries()) == dict(plain.entries())
    assert split > 1000 if parts > 1 else split == 0
