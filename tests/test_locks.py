"""Locks with real processes: exclusion, FIFO, holder death, leases, timeouts, ownership."""

import asyncio
import os
import signal
import threading
import time

import pytest

import django_clustershm as clustershm
from django_clustershm.exceptions import LimitExceeded, LockNotOwned, LockTimeout, WouldDeadlock
from django_clustershm.wire import frames as P

from .conftest import RemoteEngine
from .helpers import block_until_killed, fork_call, lock_waiters, reap, run_forked, wait_until
from .test_manager import _handshaked_socket


def waiters(key: str) -> int:
    return lock_waiters(key)


# -- exclusion across processes ------------------------------------------------------


def test_four_processes_locked_read_modify_write_is_exact(shared):
    clustershm.set("total", 0)

    def worker(i):
        for _ in range(2000):
            with clustershm.mutex("total-lock", timeout=30):
                clustershm.set("total", clustershm.get("total") + 1)  # not atomic without the lock

    assert run_forked(4, worker, timeout=120) == [0] * 4
    assert clustershm.get("total") == 8000


def test_waiters_are_granted_in_fifo_order(shared):
    holder = clustershm.Lock("fifo")
    assert holder.acquire()
    pids = []

    def waiter(i):
        with clustershm.mutex("fifo", timeout=30):
            clustershm.set(f"order:{clustershm.incr('order-seq')}", i)

    for i in range(5):
        pids.append(fork_call(waiter, i))
        wait_until(lambda i=i: waiters("fifo") == i + 1, message=f"waiter {i} queued")
    holder.release()
    assert [reap(pid, 30) for pid in pids] == [0] * 5
    assert [clustershm.get(f"order:{n}") for n in range(1, 6)] == [0, 1, 2, 3, 4]


def test_release_says_whether_a_waiter_got_the_lock(shared):
    """The release of a contended lock reports the hand-over (the client then
    yields its CPU to the woken waiter); an uncontended one, a free lock."""
    client = clustershm.get_client()
    token, _fence = client.lock_acquire("handed", None, None)
    assert client.lock_release("handed", token) is False  # nobody waited: free now

    token, _fence = client.lock_acquire("handed", None, None)

    def waiter():
        with clustershm.mutex("handed", timeout=30):
            clustershm.set("waiter-had-it", True)

    pid = fork_call(waiter)
    wait_until(lambda: waiters("handed") == 1, message="the waiter queued")
    assert client.lock_release("handed", token) is True  # granted to the waiter
    assert reap(pid, 30) == 0
    assert clustershm.get("waiter-had-it") is True


def test_sigkill_of_the_holder_frees_the_lock_at_once_or_within_its_lease(shared):
    """Locally at once (the connection closes); on Redis within one lease (its
    watchdog stops renewing it): each engine's own guarantee (#15)."""
    r, w = os.pipe()

    def holder():
        clustershm.Lock("victim").acquire()
        os.write(w, b"held")
        block_until_killed()

    holder_pid = fork_call(holder)
    assert os.read(r, 4) == b"held"

    def next_waiter():
        with clustershm.mutex("victim", timeout=30):  # no lease anywhere
            os.write(w, str(time.monotonic()).encode().ljust(32))

    waiter_pid = fork_call(next_waiter)
    wait_until(lambda: waiters("victim") == 1, message="waiter queued")
    killed_at = time.monotonic()
    os.kill(holder_pid, signal.SIGKILL)
    granted_at = float(os.read(r, 32))
    delay = granted_at - killed_at
    reap(holder_pid, 10)
    assert reap(waiter_pid, 30) == 0
    os.close(r)
    os.close(w)
    print(f"lock granted {delay * 1000:.1f} ms after the holder's SIGKILL")
    if isinstance(shared, RemoteEngine):
        lease = shared.options["LOCK_LEASE"]
        assert 0 <= delay <= lease + 0.5  # within one lease of the last renewal (bench_redis measures it)
    else:
        assert 0 <= delay < 5  # freed by the death itself: no lease was set (bench/bench_locks.py measures it)


def test_fencing_tokens_increase_with_every_grant(anywhere):
    fences = []
    for _ in range(3):
        with clustershm.mutex("fenced") as lock:
            fences.append(lock.fence)
    assert fences == sorted(fences) and len(set(fences)) == 3


def test_lease_expiry_hands_the_lock_over(anywhere):
    lock = clustershm.Lock("leased", lease=0.2)
    assert lock.acquire()
    first_fence = lock.fence
    start = time.monotonic()
    result = {}

    def waiter():
        other = clustershm.Lock("leased")
        result["got"] = other.acquire(timeout=10)
        result["fence"] = other.fence
        result["after"] = time.monotonic() - start
        other.release()

    t = threading.Thread(target=waiter)
    t.start()
    t.join(20)
    assert result["got"] is True
    assert result["after"] >= 0.15  # not before the lease ran out
    assert result["fence"] > first_fence
    assert not lock.owned()
    with pytest.raises(LockNotOwned):
        lock.release()  # too late: the lease ran out and another holder came and went


def test_extend_keeps_the_lock(anywhere):
    lock = clustershm.Lock("extended", lease=0.3)
    witness = clustershm.Lock("witness", lease=0.3)  # same lease, never extended
    assert lock.acquire() and witness.acquire()

    def extend_until_witness_expires():
        lock.extend()
        return not witness.locked()

    wait_until(extend_until_witness_expires, timeout=10, message="the witness's lease running out")
    assert lock.owned()
    lock.extend(5)
    witness2 = clustershm.Lock("witness2", lease=0.4)
    assert witness2.acquire()
    wait_until(lambda: not witness2.locked(), timeout=10, message="a 0.4 s lease running out")
    assert lock.owned()
    lock.release()
    with pytest.raises(LockNotOwned):
        lock.extend()


def test_acquire_timeout_and_try_acquire(anywhere):
    holder = clustershm.Lock("busy")
    holder.acquire()
    result = {}

    def contender():
        lock = clustershm.Lock("busy")
        result["try"] = lock.acquire(blocking=False)
        start = time.monotonic()
        result["timed"] = lock.acquire(timeout=0.2)
        result["waited"] = time.monotonic() - start
        try:
            with clustershm.mutex("busy", timeout=0.1):
                pass
        except LockTimeout as exc:
            result["mutex"] = exc
        try:
            clustershm.get_lock("busy", timeout=0)
        except LockTimeout:
            result["get_lock"] = True

    t = threading.Thread(target=contender)
    t.start()
    t.join(20)
    holder.release()
    assert result["try"] is False and result["timed"] is False
    assert result["waited"] >= 0.15
    assert isinstance(result["mutex"], LockTimeout) and result["get_lock"]


def test_wait_timeouts_fire_while_the_manager_is_busy(cluster):
    """The Manager runs its timers when it is about to sleep and at least every
    millisecond while requests keep it busy: a wait ends on time under load."""
    holder = clustershm.Lock("loaded")
    holder.acquire()

    def hammer(i):
        end = time.monotonic() + 3
        while time.monotonic() < end:
            clustershm.incr("hammer")

    pids = [fork_call(hammer, i) for i in range(2)]
    wait_until(lambda: clustershm.get("hammer", 0) > 100, message="the load started")
    result = {}

    def waiter():  # another thread: the holder's own would be refused (WouldDeadlock)
        start = time.monotonic()
        result["acquired"] = clustershm.Lock("loaded").acquire(timeout=0.3)
        result["waited"] = time.monotonic() - start

    t = threading.Thread(target=waiter)
    t.start()
    t.join(20)
    assert [reap(pid, 30) for pid in pids] == [0, 0]
    holder.release()
    assert result["acquired"] is False
    assert 0.3 <= result["waited"] < 1.3, result


def test_a_waiter_that_timed_out_is_never_granted(shared):
    holder = clustershm.Lock("late")
    holder.acquire()

    def impatient():
        assert clustershm.Lock("late").acquire(timeout=0.2) is False
        block_until_killed()  # alive, connection open: it must still not get the lock

    pid = fork_call(impatient)
    wait_until(lambda: waiters("late") == 1, message="queued")
    wait_until(lambda: waiters("late") == 0, timeout=5, message="timed out and removed")
    holder.release()
    assert not clustershm.Lock("late").locked()
    assert clustershm.Lock("late").acquire(blocking=False)
    os.kill(pid, signal.SIGKILL)
    reap(pid, 10)


def test_release_by_a_non_owner_fails(anywhere):
    token = clustershm.get_lock("owned")
    with pytest.raises(LockNotOwned):
        clustershm.release_lock("owned", os.urandom(16))
    with pytest.raises(LockNotOwned):
        clustershm.Lock("owned").release()  # never acquired through this object
    clustershm.release_lock("owned", token)
    with pytest.raises(LockNotOwned):
        clustershm.release_lock("owned", token)  # twice


def test_another_thread_cannot_release_or_take_over(anywhere):
    lock = clustershm.Lock("threaded")
    lock.acquire()
    seen = {}

    def other_thread():
        try:
            lock.release()
        except LockNotOwned:
            seen["release"] = "refused"
        seen["owned"] = lock.owned()
        seen["acquire"] = lock.acquire(blocking=False)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(10)
    assert seen == {"release": "refused", "owned": False, "acquire": False}
    assert lock.owned()
    lock.release()


def test_mutex_releases_on_exceptions_and_decorates(anywhere):
    with pytest.raises(ZeroDivisionError), clustershm.mutex("boom"):
        _ = 1 / 0
    assert not clustershm.Lock("boom").locked()

    @clustershm.mutex("decorated", timeout=5)
    def critical(x):
        assert clustershm.Lock("decorated").locked()
        return x * 2

    assert critical(21) == 42
    assert not clustershm.Lock("decorated").locked()


def test_reentrancy(anywhere):
    with clustershm.mutex("re"):
        with pytest.raises(WouldDeadlock):
            clustershm.Lock("re").acquire()
        assert clustershm.Lock("re").acquire(blocking=False) is False
    with clustershm.mutex("re2", reentrant=True) as outer:
        with clustershm.mutex("re2", reentrant=True) as inner:
            assert inner.fence == outer.fence
        assert clustershm.Lock("re2").locked()  # still held by the outer level
    assert not clustershm.Lock("re2").locked()


def test_a_thread_that_ends_releases_its_locks(anywhere):
    def grab():
        clustershm.Lock("abandoned").acquire()  # and the thread ends without releasing

    t = threading.Thread(target=grab)
    t.start()
    t.join()
    assert clustershm.Lock("abandoned").acquire(timeout=5)


def test_locks_live_apart_from_store_and_caches(anywhere):
    with clustershm.mutex("apart"):
        clustershm.set("apart", 1)
        clustershm.clear()
        assert clustershm.Lock("apart").locked()


def test_stats_list_holders_and_waiters(cluster):
    holder = clustershm.Lock("seen", lease=60)
    holder.acquire()

    def waiter():
        clustershm.Lock("seen").acquire(timeout=30)

    pid = fork_call(waiter)
    wait_until(lambda: waiters("seen") == 1, message="queued")
    (held,) = [h for h in clustershm.stats()["locks"]["held"] if h["key"] == "seen"]
    assert held["pid"] == os.getpid() and held["waiters"] == [pid]
    assert 0 < held["lease_left"] <= 60 and held["held_for"] >= 0
    holder.release()
    assert reap(pid, 10) == 0


def test_waiters_per_connection_are_limited(cluster):
    holder = clustershm.Lock("crowded")
    holder.acquire()
    from django_clustershm.server.locktable import MAX_WAITERS_PER_SESSION as most

    sock = _handshaked_socket(cluster.address, cluster.secret)
    frames = b"".join(P.encode(P.LOCK_ACQUIRE, rid, ["crowded", None, None]) for rid in range(1, most + 2))
    sender = threading.Thread(target=sock.sendall, args=(frames,))
    sender.start()  # while this thread reads what comes back
    reader = P.FrameReader(max_frame=1 << 20)
    sock.settimeout(10)
    queued, replies = [], []
    while not replies:
        for frame in reader.feed(sock.recv(65536)):
            (queued if frame[0] == P.PUSH_QUEUED else replies).append(frame)
    sender.join()
    assert [rid for _, rid, _ in queued] == list(range(1, most + 1))  # each waiter is told it waits
    op, rid, payload = replies[0]
    assert op == P.ERR and rid == most + 1
    assert P.decode_payload(payload)[0] == LimitExceeded.code
    sock.close()
    holder.release()
    wait_until(lambda: not clustershm.Lock("crowded").locked(), message="the rogue's grants freed")


def test_amutex_in_async_code(anywhere):
    async def main():
        order = []

        async def task(name):
            async with clustershm.amutex("async", timeout=10) as m:
                order.append((name, m.fence))
                await asyncio.sleep(0.01)

        await asyncio.gather(*(task(i) for i in range(4)))
        return order

    order = asyncio.run(main())
    assert sorted(n for n, _ in order) == [0, 1, 2, 3]
    assert [f for _, f in order] == sorted(f for _, f in order)
    assert not clustershm.Lock("async").locked()


def test_amutex_timeout(anywhere):
    holder = clustershm.Lock("async-busy")
    holder.acquire()

    async def main():
        async with clustershm.amutex("async-busy", timeout=0.1):
            pass

    with pytest.raises(LockTimeout):
        asyncio.run(main())
    holder.release()


def test_embedded_client_is_the_default_outside_a_cluster():
    assert isinstance(clustershm.get_client().transport, clustershm.EmbeddedTransport)
    with clustershm.mutex("embedded"):
        assert clustershm.Lock("embedded").locked()
