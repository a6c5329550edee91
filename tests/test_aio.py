"""The asyncio client (#14): the sync API's semantics, awaited, with no thread per call.

Contract tests run on every transport (embedded, socket, socket + near
cache); the lock and connection tests use a real Manager process, and the
cross-process ones real forked processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

import django_clustershm as clustershm
from django_clustershm import LockNotOwned, LockTimeout, ManagerUnavailable, WouldDeadlock

from .helpers import ManagerProcess, fork_call, reap, wait_until

# -- the same semantics as the sync API, on every transport -------------------------------


def test_the_async_api_matches_the_sync_one(client):
    aio = client.aio

    async def main():
        await aio.aset("a", {"x": 1})
        assert await aio.aget("a") == {"x": 1} == client.get("a")
        assert await aio.aget("missing", "default") == "default"
        assert await aio.aadd("a", 2) is False and await aio.aadd("b", 2, timeout=60) is True
        assert await aio.ahas("b") and await aio.ahas_key("b")
        assert await aio.aincr("n") == 1 and await aio.aincr("n", 41) == 42 and await aio.adecr("n", 2) == 40
        assert await aio.atouch("b", 120) is True and await aio.atouch("nope") is False
        await aio.aset_many({"m1": 1, "m2": [2]}, timeout=30)
        assert await aio.aget_many(["m1", "m2", "zz"]) == {"m1": 1, "m2": [2]}
        assert await aio.adelete_many(["m1", "zz"]) == 1
        assert sorted(await aio.akeys("m")) == ["m2"]
        assert await aio.aremove("a") is True and await aio.aremove("a") is False
        assert (await aio.astats())["store"]["keys"] == len(client.keys())
        assert await aio.aping()
        cache = aio.cache("sessions", max_entries=100)
        await cache.aset("s", "tom")
        assert await cache.aget("s") == "tom" == client.cache("sessions").get("s")
        assert await cache.aclear() == 1
        assert await aio.aclear() >= 3
        await aio.aclose()

    asyncio.run(main())
    assert client.get("n") is None  # cleared, as the sync client sees it


def test_bad_arguments_get_the_sync_errors(client):
    from django_clustershm import InvalidKey, KeyTooLarge, NotAnInteger, ValueTooLarge

    aio = client.aio

    async def main():
        with pytest.raises(InvalidKey):
            await aio.aget(5)
        with pytest.raises(KeyTooLarge):
            await aio.aset("x" * 5000, 1)
        await aio.aset("s", "text")
        with pytest.raises(NotAnInteger):
            await aio.aincr("s")
        with pytest.raises(ValueTooLarge):
            await aio.aset("big", b"x" * (client.limits.max_value + 1))
        assert await aio.aget("s") == "text"  # and nothing was lost

    asyncio.run(main())


# -- one pipelined connection per loop ----------------------------------------------------


def test_thousands_of_concurrent_calls_share_one_connection(cluster):
    async def main():
        # 2,000 keys, each read once: first reads of the default near cache
        # (adaptive) go to the Manager, none is answered locally.
        await clustershm.aset_many({f"k{i}": "v" for i in range(2000)})
        threads = threading.active_count()
        results = await asyncio.gather(*(clustershm.aget(f"k{i}") for i in range(2000)))
        assert results == ["v"] * 2000
        assert threading.active_count() == threads  # no thread per call
        stats = await clustershm.astats()
        return stats["clients"]

    clients = asyncio.run(main())
    mine = [c for c in clients if c["pid"] == os.getpid() and c["ops"] >= 2000]
    assert len(mine) == 1  # the 2,000 calls went over one connection


def test_async_reads_keep_no_copy_of_a_key_written_elsewhere_between_two_reads(cluster):
    """The adaptive near cache's marks (see test_near_cache.py), through the asyncio client."""
    clustershm.set_many({"warm": 0, "k": 0, "m": 0})

    def written_elsewhere(n):
        assert reap(fork_call(lambda: clustershm.set_many({"k": n, "m": n})), 10) == 0

    async def main():
        assert await clustershm.aget("warm") == 0 and await clustershm.aget("warm") == 0  # the channel opens
        assert await clustershm.aget("k") == 0 and await clustershm.aget_many(["m"]) == {"m": 0}  # marks
        written_elsewhere(1)
        assert await clustershm.aget("k") == 1 and await clustershm.aget_many(["m"]) == {"m": 1}  # declined
        stats = clustershm.near_stats()[""]
        assert (stats["declined"], stats["entries"]) == (2, 1)
        assert await clustershm.aget("k") == 1 and await clustershm.aget_many(["m"]) == {"m": 1}  # kept now
        hits = clustershm.near_stats()[""]["hits"]
        assert await clustershm.aget("k") == 1 and await clustershm.aget_many(["m"]) == {"m": 1}
        assert clustershm.near_stats()[""]["hits"] == hits + 2
        written_elsewhere(2)
        assert await clustershm.aget("k") == 2 and await clustershm.aget_many(["m"]) == {"m": 2}

    asyncio.run(main())


def test_each_loop_gets_its_own_connection_and_a_closed_loops_goes_quietly(cluster):
    # Warnings are errors in this suite: a socket left open by a closed loop would fail it.
    import gc

    def mine() -> int:
        return len([c for c in clustershm.stats()["clients"] if c["pid"] == os.getpid()])

    before = mine()
    for i in range(5):
        asyncio.run(clustershm.aset(f"k{i}", i))
    assert asyncio.run(clustershm.aget("k4")) == 4
    gc.collect()
    wait_until(lambda: mine() == before, message="the closed loops' connections closed")


def test_a_call_that_times_out_keeps_the_connection_and_its_locks(cluster):
    """A timeout gives up its own future only: another task's lock stays held."""
    aio = clustershm.get_client().aio

    async def main():
        lock = clustershm.AsyncLock("kept")
        assert await lock.acquire()
        conn = await aio.transport.connection()
        # A request whose reply cannot come in time (a lock wait longer than its reply timeout).
        with pytest.raises(ManagerUnavailable, match="no reply"):
            await aio.transport.call(clustershm.client.socket.F.LOCK_ACQUIRE, ["kept", None, 5.0], 0.05)
        assert conn.lost is None and await aio.transport.connection() is conn
        assert await lock.owned()
        await lock.release()

    asyncio.run(main())


def test_the_client_reconnects_after_a_manager_restart():
    proc = ManagerProcess().start()
    try:
        clustershm.configure(proc.address, proc.secret)

        async def use():
            await clustershm.aset("k", 1)
            return await clustershm.aget("k")

        async def main():
            assert await use() == 1
            proc.kill()
            proc.start()  # a new Manager on the same address (and in the same directory, which cleanup removes)
            for _ in range(50):  # the first call may find the old connection dead
                try:
                    return await use()
                except ManagerUnavailable:
                    await asyncio.sleep(0.02)
            raise AssertionError("never reconnected")

        assert asyncio.run(main()) == 1
    finally:
        clustershm.configure(None)
        proc.cleanup()


def test_a_forked_child_gets_its_own_connection(cluster):
    asyncio.run(clustershm.aset("parent", 1))

    def child():
        async def main():
            assert await clustershm.aget("parent") == 1
            await clustershm.aset("child", os.getpid())

        asyncio.run(main())

    assert reap(fork_call(child), 30) == 0
    assert asyncio.run(clustershm.aget("child")) is not None
    assert asyncio.run(clustershm.aget("parent")) == 1  # the parent's connection was left alone


# -- AsyncLock and amutex ---------------------------------------------------------------


def test_5000_waiters_on_one_key_in_one_loop_are_exact_and_take_no_threads(local_anywhere):
    """The old amutex waited in to_thread: 8 waiters on 6 pool threads never
    finished. 5,000 tasks now queue in the Manager as 5,000 pipelined requests."""
    count = 5000
    seen_threads = []

    async def main():
        counter = {"n": 0}

        async def task():
            async with clustershm.amutex("hot", timeout=60):
                value = counter["n"]
                await asyncio.sleep(0)  # a task switch inside the critical section
                counter["n"] = value + 1
                if counter["n"] % 500 == 0:
                    seen_threads.append(threading.active_count())

        threads = threading.active_count()
        await asyncio.gather(*(task() for _ in range(count)))
        return counter["n"], threads

    total, threads = asyncio.run(main())
    assert total == count
    assert max(seen_threads) <= threads + 1  # no thread per waiter (the embedded ticker is a task)
    assert not clustershm.Lock("hot").locked()


def test_fifo_fencing_and_ownership_per_task(anywhere):
    async def main():
        lock = clustershm.AsyncLock("fair")
        order = []

        async def task(i):
            async with clustershm.AsyncLock("fair", timeout=10) as held:
                order.append((i, held.fence))
                await asyncio.sleep(0.005)  # holds it a little

        assert await lock.acquire()
        waiters = []
        for i in range(5):  # queued one after the other, in this order
            waiters.append(asyncio.create_task(task(i)))
            await _until_waiting(i + 1)
        other = asyncio.create_task(lock.release())  # another task does not own it
        with pytest.raises(LockNotOwned):
            await other
        with pytest.raises(WouldDeadlock):
            await lock.acquire()  # the same task asking again
        assert await lock.acquire(blocking=False) is False
        await lock.release()
        await asyncio.gather(*waiters)
        return order

    order = asyncio.run(main())
    assert [i for i, _ in order] == [0, 1, 2, 3, 4]
    fences = [f for _, f in order]
    assert fences == sorted(fences) and len(set(fences)) == 5


def test_reentrant_async_lock(anywhere):
    async def main():
        lock = clustershm.AsyncLock("re", reentrant=True)
        async with lock:
            async with lock:
                assert await lock.owned()
            assert await lock.owned()
        assert not await lock.locked()

    asyncio.run(main())


def test_a_timeout_raises_and_leaves_nothing_queued(anywhere):
    holder = clustershm.Lock("busy")
    holder.acquire()

    async def main():
        with pytest.raises(LockTimeout):
            async with clustershm.amutex("busy", timeout=0.1):
                pass
        assert await clustershm.AsyncLock("busy").acquire(timeout=0) is False

    asyncio.run(main())
    holder.release()
    assert not clustershm.Lock("busy").locked()


async def _until_waiting(count: int, timeout: float = 10.0) -> None:
    """Until the Manager queues ``count`` lock requests in all (a condition, not a delay)."""
    deadline = time.monotonic() + timeout
    while (await clustershm.astats())["locks"]["waiting"] != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the Manager never queued {count} lock requests")
        await asyncio.sleep(0.002)


def test_a_task_cancelled_while_waiting_leaves_no_wait_and_no_lock(anywhere):
    holder = clustershm.Lock("cancel-me")
    holder.acquire()

    async def main():
        waiting = asyncio.create_task(clustershm.AsyncLock("cancel-me").acquire(timeout=30))
        await _until_waiting(1)  # queued in the Manager
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await _until_waiting(0)  # the cancel took the wait back

    asyncio.run(main())
    holder.release()  # with the cancelled wait still queued, this would hand the lock to it
    assert not clustershm.Lock("cancel-me").locked()
    assert clustershm.Lock("cancel-me").acquire(blocking=False)


def test_cancelled_waiters_leave_the_queue_and_the_others_keep_their_turn(cluster):
    """Real processes: another process holds the lock, 40 tasks of this one
    queue for it in order, every other one is cancelled. The Manager's queue
    then holds the 20 others only (its own figures), and when the holder
    dies they get the lock in their order; no cancelled task ever does."""
    r, w = os.pipe()

    def holder():
        os.close(r)
        assert clustershm.get_lock("queue") is not None
        os.write(w, b"1")
        while True:
            time.sleep(60)

    pid = fork_call(holder)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    granted: list[int] = []

    async def main():
        async def take(i):
            lock = clustershm.AsyncLock("queue")
            assert await lock.acquire(timeout=60)
            granted.append(i)
            await lock.release()

        tasks = []
        for i in range(40):
            tasks.append(asyncio.create_task(take(i)))
            await _until_waiting(i + 1)  # queued in this order
        for task in tasks[1::2]:
            task.cancel()
        await _until_waiting(20)  # the cancels took 20 waits out of the queue
        (held,) = [h for h in (await clustershm.astats())["locks"]["held"] if h["key"] == "queue"]
        assert held["pid"] == pid and held["waiters"] == [os.getpid()] * 20
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(task.cancelled() for task in tasks[1::2])

    try:
        asyncio.run(main())
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid, 10)
    assert granted == list(range(0, 40, 2))
    assert clustershm.stats()["locks"]["waiting"] == 0 and not clustershm.Lock("queue").locked()


def test_a_grant_that_races_the_cancellation_is_released(anywhere):
    """Cancelled just as the lock is granted: the grant is given back, never leaked."""
    for attempt in range(20):
        key = f"race{attempt}"
        token = clustershm.get_lock(key)

        async def take(key=key):
            lock = clustershm.AsyncLock(key)
            if await lock.acquire(timeout=30):
                await lock.release()  # the grant won the race: its task gives it back

        async def main(key=key, token=token):
            waiting = asyncio.create_task(take())
            await _until_waiting(1)
            await asyncio.to_thread(clustershm.release_lock, key, token)  # the grant is on its way...
            waiting.cancel()  # ...and the task goes
            try:
                await waiting
            except asyncio.CancelledError:
                pass

        asyncio.run(main())
        wait_until(lambda key=key: not clustershm.Lock(key).locked(), message=f"{key} free")


def test_a_holder_cancelled_inside_the_block_releases(anywhere):
    async def main():
        entered = asyncio.Event()

        async def hold():
            async with clustershm.amutex("inside"):
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(hold())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await clustershm.AsyncLock("inside").locked()

    asyncio.run(main())


def test_a_sigkilled_process_holding_an_async_lock_frees_it_for_another(cluster):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:

            async def hold():
                async with clustershm.amutex("doomed"):
                    os.write(w, b"1")
                    await asyncio.sleep(60)

            asyncio.run(hold())
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"

        async def wait_for_it():
            started = time.monotonic()
            async with clustershm.amutex("doomed", timeout=10) as lock:
                return lock.fence, time.monotonic() - started

        async def main():
            waiter = asyncio.create_task(wait_for_it())
            await _until_waiting(1)
            os.kill(pid, signal.SIGKILL)
            return await waiter

        fence, _waited = asyncio.run(main())
        assert fence is not None
    finally:
        os.close(r)
        reap(pid, 10)


# -- listeners with coroutine callbacks ------------------------------------------------------


def test_a_coroutine_listener_runs_on_its_loop_in_order_for_writes_of_another_process(shared):
    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        done = asyncio.Event()

        async def on_change(key, value, event):
            assert asyncio.get_running_loop() is loop  # on the loop that registered it
            await asyncio.sleep(0)  # awaiting inside does not reorder events
            seen.append((key, value, event))
            if value == 49:
                done.set()

        handle = await clustershm.alisten(prefix="feed:", callback=on_change)

        def writer():
            for i in range(50):
                clustershm.set("feed:x", i)

        pid = fork_call(writer)
        await asyncio.wait_for(done.wait(), 10)
        assert await asyncio.to_thread(reap, pid, 10) == 0
        handle.cancel()
        return seen

    seen = asyncio.run(main())
    assert [v for _, v, _ in seen] == list(range(50))
    assert {(k, e) for k, _, e in seen} == {("feed:x", "set")}


def test_a_coroutine_listener_needs_a_loop(cluster):
    async def on_change(key, value, event):
        pass

    with pytest.raises(clustershm.ArgumentTypeError, match="event loop"):
        clustershm.listen("k", on_change)


def test_the_default_timeout_expires_calls_in_order_and_keeps_the_connection(cluster):
    """Calls with the transport's default timeout share one sweeping timer."""
    from django_clustershm.client.aio import AsyncSocketTransport
    from django_clustershm.wire import frames as P

    transport = AsyncSocketTransport(cluster.address, cluster.secret, timeout=0.2)
    holder = clustershm.Lock("swept")
    holder.acquire()

    async def main():
        conn = await transport.connection()
        waits = [transport.call(P.LOCK_ACQUIRE, ["swept", None, 30.0]) for _ in range(3)]
        results = await asyncio.gather(*waits, transport.call(P.PING, []), return_exceptions=True)
        assert [type(r) for r in results[:3]] == [ManagerUnavailable] * 3
        assert results[3] == "pong"
        assert conn.lost is None and await transport.call(P.PING, []) == "pong"
        await transport.close()

    asyncio.run(main())
    holder.release()


def test_async_leases_expire_and_extend(anywhere):
    async def main():
        lock = clustershm.AsyncLock("leased", lease=0.3)
        assert await lock.acquire()
        await lock.extend(1.0)  # the lease restarts: 1 s from now
        await asyncio.sleep(0.5)
        assert await lock.owned()  # past the first lease, within the extended one
        other = clustershm.AsyncLock("leased", timeout=5)
        started = time.monotonic()
        assert await asyncio.create_task(other.acquire())  # granted when the lease runs out
        assert time.monotonic() - started < 2
        assert not await lock.owned()
        with pytest.raises(LockNotOwned):
            await lock.release()  # its lease ran out

    asyncio.run(main())
