"""A connection that closes holding a lot never stalls the Manager's loop (#12, Deliver 3).

What a client can see of the close happens at once (its locks are free or
handed to the next waiter, it is sent nothing more, the figures no longer
count it); what the tables keep of it is swept by Engine.tick(), a bounded
amount of work per call. The unit tests below count that work on a fake
clock; the process test kills a child holding #12's sizes and reads the
Manager's own figures.
"""

import math
import os
import signal

import pytest

from django_clustershm.server import engine as engine_module
from django_clustershm.server.engine import DEFERRED, Engine
from django_clustershm.wire import frames as P

from .helpers import ManagerProcess, block_until_killed, fork_call, reap, socket_client, wait_until
from .test_manager import _handshaked_socket


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _loaded_engine(locks: int, tracked: int):
    """An engine where one session holds ``locks`` locks and a tracker's process
    read ``tracked`` keys into its near cache (which leaves the Manager nothing to keep)."""
    clock = Clock()
    engine = Engine(clock=clock)
    holder, tracker, reader = engine.open_session(), engine.open_session(), engine.open_session()
    for i in range(locks):
        engine.dispatch(holder, P.LOCK_ACQUIRE, [f"lock:{i}", None, None])
    engine.dispatch(tracker, P.TRACKER, [])
    engine.dispatch(reader, P.SET_MANY, ["", [x for i in range(tracked) for x in (f"k{i}", i)], None])
    assert len(engine.dispatch(tracker, P.TRACK_GET_MANY, ["", [f"k{i}" for i in range(tracked)]])) == tracked
    return engine, clock, holder, tracker, reader


def _recount(engine) -> dict:
    """The figures stats() gives, counted from scratch over the tables."""
    live = set(engine.sessions)
    locks = engine.locks
    return {
        "held": sum(1 for key in dict.keys(locks._held) if locks.holder_info(key)["sid"] in live),
        "waiting": sum(1 for q in locks._queues.values() for w in q if w.session.id in live),
        "subscriptions": sum(len(subs) for _, subs in engine.subscriptions._by_session.values()),
    }


def _figures(engine, session) -> dict:
    stats = engine.dispatch(session, P.STATS, [])
    return {
        "held": stats["locks"]["held_count"],
        "waiting": stats["locks"]["waiting"],
        "subscriptions": stats["listeners"]["subscriptions"],
    }


def test_tick_sweeps_a_closed_session_a_bounded_amount_at_a_time(monkeypatch):
    monkeypatch.setattr(engine_module, "SWEEP_BUDGET", 256)
    engine, clock, holder, tracker, reader = _loaded_engine(3000, 1000)
    granted = []
    reader.deliver = lambda rid, result: granted.append((rid, result))
    assert engine.dispatch(reader, P.LOCK_ACQUIRE, ["lock:1500", None, None], 7) is DEFERRED
    assert engine.tick() is None  # nothing due, nothing to sweep

    engine.close_session(holder)
    engine.close_session(tracker)
    assert [rid for rid, _ in granted] == [7]  # the waiter has its lock at once, before any sweep
    assert engine.sweep_pending == 1 and _figures(engine, reader) == _recount(engine)  # the holder's locks
    assert _figures(engine, reader) == {"held": 1, "waiting": 0, "subscriptions": 0}
    token, _ = engine.dispatch(reader, P.LOCK_ACQUIRE, ["lock:2999", None, 0])  # free at once, not "held"

    steps = []
    while engine.sweep_pending:
        swept = engine.swept
        due = engine.tick()
        assert due == (clock.now if engine.sweep_pending else None)  # more to do: come back at once
        steps.append(engine.swept - swept)
        assert _figures(engine, reader) == _recount(engine)
    assert engine.tick() is None  # done: the loop may sleep
    assert max(steps) <= 256 and len(steps) == math.ceil(3000 / 256)
    assert sum(steps) == 3000  # each of its lock keys, once (a tracker leaves nothing to sweep)
    assert sorted(dict.keys(engine.locks._held)) == ["lock:1500", "lock:2999"] and engine.locks._queues == {}
    assert engine.locks._holds.keys() == {reader.id}
    stats = engine.dispatch(reader, P.STATS, [])
    assert stats["sweep"] == {"pending": 0, "swept": 3000, "largest": 256}
    assert stats["locks"]["held_count"] == 2 and len(stats["locks"]["held"]) == 2
    assert engine.dispatch(reader, P.LOCK_RELEASE, ["lock:2999", token]) is False


def test_a_closed_session_is_sent_nothing_while_it_is_swept(monkeypatch):
    monkeypatch.setattr(engine_module, "SWEEP_BUDGET", 10)
    engine, clock, holder, tracker, reader = _loaded_engine(100, 100)
    heard = []
    for session in (holder, tracker):
        session.push = heard.append
        session.deliver = lambda rid, result: heard.append((rid, result))
    engine.dispatch(holder, P.LISTEN, [1, "", "k", True])
    engine.dispatch(tracker, P.LISTEN, [1, "", "", True])
    assert engine.dispatch(holder, P.LOCK_ACQUIRE, ["lock:0", None, 5.0], 9) is DEFERRED  # waits for itself
    engine.dispatch(reader, P.SET, ["", "k1", b"v", None])
    assert len(heard) == 2  # both listeners
    heard.clear()

    engine.close_session(tracker)
    engine.close_session(holder)
    engine.tick()  # a little swept, not all
    assert engine.sweep_pending
    for i in range(100):
        engine.dispatch(reader, P.SET, ["", f"k{i}", b"new", None])
        engine.dispatch(reader, P.REMOVE, ["", f"k{i + 50}"])
    engine.dispatch(reader, P.CLEAR, [""])
    clock.now += 10  # the closed session's wait runs out
    while engine.sweep_pending:
        engine.tick()
    assert heard == []
    assert _figures(engine, reader) == _recount(engine) == {"held": 0, "waiting": 0, "subscriptions": 0}


def hold_everything(address: str, secret: bytes, locks: int, tracked: int, listeners: int, w: int) -> None:
    """Body of a child process: take ``locks`` locks, read ``tracked`` keys of
    the store into its near cache (TRACK_GET_MANY), listen to ``listeners`` x 1,000 prefixes
    (on as many connections: a connection holds 1,024 subscriptions at most),
    write a byte to ``w``, and wait for the SIGKILL."""
    main = _handshaked_socket(address, secret)
    main.settimeout(60)
    reader = P.FrameReader(P.DEFAULT_MAX_FRAME)

    def call(sock, frames):
        sock.sendall(b"".join(frames))
        replies = []
        while len(replies) < len(frames):
            replies += reader.feed(sock.recv(1 << 20))
        assert all(op == P.OK for op, _, _ in replies), replies[:3]
        return [P.decode_payload(payload) for _, _, payload in replies]

    for start in range(0, locks, 1000):
        call(main, [P.encode(P.LOCK_ACQUIRE, i, [f"lock:{i}", None, None]) for i in range(start, start + 1000)])
    tracker = _handshaked_socket(address, secret)
    call(tracker, [P.encode(P.TRACKER, 1, [])])
    for start in range(0, tracked, 4096):
        keys = [f"k{i}" for i in range(start, start + 4096)]
        call(main, [P.encode(P.SET_MANY, 1, ["", [x for key in keys for x in (key, 1)], None])])
        (found,) = call(main, [P.encode(P.TRACK_GET_MANY, 2, ["", keys])])
        assert len(found) == len(keys)
    keep = [main, tracker]
    for j in range(listeners):  # 1,000 prefix subscriptions each (a connection may hold 1,024)
        sock = _handshaked_socket(address, secret)
        call(sock, [P.encode(P.LISTEN, i, [i, "", f"p{j}:{i}:", True]) for i in range(1000)])
        keep.append(sock)
    os.write(w, b"1")
    block_until_killed()


def start_holding_everything(proc, locks: int, tracked: int, listeners: int):
    """Fork a child that holds all of that on ``proc`` (see hold_everything) and
    wait until it does: ``(its pid, a client of proc's)``, the setup checked."""
    r, w = os.pipe()

    def child():
        os.close(r)
        hold_everything(proc.address, proc.secret, locks, tracked, listeners, w)

    client = socket_client(proc.address, proc.secret, timeout=30)
    pid = None
    try:
        pid = fork_call(child)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        stats = client.stats()
        assert stats["locks"]["held_count"] == locks and stats["near"]["fills"] == tracked
        assert stats["listeners"]["subscriptions"] == listeners * 1000
    except BaseException:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)  # the child we started, by pid
            reap(pid, 10)
        client.close()
        raise
    return pid, client


@pytest.mark.slow
def test_killing_a_process_that_holds_100k_locks_65k_tracked_keys_and_10k_listeners():
    """The Manager's loop over that close: the close itself does little, the
    rest is swept SWEEP_BUDGET units a tick, and a waiter gets its lock at once.

    What is asserted tightly is the work: each tick swept at most its budget,
    and every lock key of the dead process was swept, once (its near-cache
    reads left the Manager nothing to keep). The timing
    figure is checked loosely (bench/ measures the stalls)."""
    locks, tracked, listeners = 100_000, 65_536, 10
    proc = ManagerProcess().start()
    client = None
    try:
        pid, client = start_holding_everything(proc, locks, tracked, listeners)
        waiter = _handshaked_socket(proc.address, proc.secret)
        waiter.sendall(P.encode(P.LOCK_ACQUIRE, 5, ["lock:50000", None, 30.0]))
        wait_until(lambda: client.stats()["locks"]["waiting"] == 1)
        stats = client.stats()
        before, stall_before = stats["sweep"], stats["loop"]["max_stall_ms"]

        os.kill(pid, signal.SIGKILL)
        assert reap(pid, 10) == -signal.SIGKILL
        frames, reader = [], P.FrameReader()
        while not [f for f in frames if f[0] != P.PUSH_QUEUED]:
            frames += reader.feed(waiter.recv(4096))
        assert [(op, rid) for op, rid, _ in frames] == [(P.PUSH_QUEUED, 5), (P.OK, 5)]  # handed over at the close
        stats = client.stats()
        assert stats["locks"]["held_count"] == 1 and stats["near"]["processes"] == []
        assert stats["listeners"]["subscriptions"] == 0
        granted = client.lock_acquire("lock:99999", None, 0)  # free at once, swept or not
        assert granted is not None and client.lock_release("lock:99999", granted[0]) is False
        wait_until(lambda: client.stats()["sweep"]["pending"] == 0, message="the sweep to end")
        stats = client.stats()
        assert stats["sweep"]["swept"] - before["swept"] == locks  # near-cache reads left nothing to sweep
        assert stats["sweep"]["largest"] <= engine_module.SWEEP_BUDGET
        assert stats["locks"]["held_count"] == 1
        # Generous on purpose, and only against a new maximum: with this much
        # state a gen-2 garbage collection alone stalls the loop 150-400 ms
        # (during the set-up, usually), and a loaded 2-vCPU VM preempts any
        # round. The close of these 12 connections took 276-560 ms of one
        # round before the sweep; the work figures above are the real check.
        assert stats["loop"]["max_stall_ms"] <= max(stall_before, 500), stats["loop"]
        waiter.close()
    finally:
        if client is not None:
            client.close()
        proc.cleanup()
