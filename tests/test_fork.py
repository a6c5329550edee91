"""Fork at any moment: the one ordered after-fork reset (django_clustershm/registry.py).

A prefork master forks while its other threads are mid-call, inside the near
cache, or dispatching listener events. A child must never stall on a lock
another thread held at the fork, never write into its parent's sockets, and
hear its listeners' next event at once.
"""

import os
import select
import threading
import time

import django_clustershm as clustershm

from .helpers import fork_call, reap

FORKS = 150


def test_children_forked_while_threads_hammer_the_client_never_stall_and_keep_listening(cluster):
    client = clustershm.get_client()
    client.enable_near_cache("")
    events = []
    resyncs = []

    def on_change(key, value, event):
        events.append(value)

    def on_resync():
        # What a mirror does after a fork: read again, through the near cache
        # whose lock another thread of the parent may have held at the fork.
        resyncs.append(clustershm.get_many(["hot:a", "hot:b"]))

    clustershm.listen("fork:go", on_change, on_resync=on_resync)
    stop = threading.Event()

    def hammer(n):
        while not stop.is_set():
            clustershm.set(f"hot:{'ab'[n % 2]}", n)
            clustershm.get("hot:a")  # near-cache hits and misses
            clustershm.get_many(["hot:a", "hot:b"])
            clustershm.incr("hot:count")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    r, w = os.pipe()
    try:
        for i in range(FORKS):
            forked_at = time.monotonic()

            def child(i=i, forked_at=forked_at):
                # The at-fork reset subscribed this child's listener again before
                # its code runs, within a second, whatever the parent was doing.
                assert time.monotonic() - forked_at < 1.0, "the at-fork reset stalled"
                assert resyncs, "on_resync ran (and did not deadlock on the near cache)"
                seen = len(events)
                os.write(w, b"r")
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    if i in events[seen:]:
                        break
                    time.sleep(0.001)
                else:
                    raise AssertionError(f"child {i}: no event within 1 s")
                assert clustershm.get("fork:go") == i  # and the client works

            pid = fork_call(child)
            if not select.select([r], [], [], 10)[0]:
                raise AssertionError(f"child {i} never got ready (exit status {reap(pid, 10)})")
            assert os.read(r, 1) == b"r"
            clustershm.set("fork:go", i)
            assert reap(pid, 10) == 0, f"child {i} failed"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        os.close(r)
        os.close(w)
    # The parent was never disturbed: its own listener heard every write.
    assert events[-1] == FORKS - 1
