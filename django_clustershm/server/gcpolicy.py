"""The garbage collector and the Manager's loop (#12): no full collection stalls it.

CPython frees almost everything by reference counting; its cycle collector
exists for reference cycles, and a *full* (generation 2) collection visits
every container object the process tracks, in one go: the Manager's loop, and
every client waiting on it, stops meanwhile. With 100,000 held locks (two
objects each), 65,536 tracked near-cache pairs (a dict each, when the
Manager still tracked them) and 10,000
prefix listeners (a dict each), one full collection took 58 ms in the
Manager's process, and they come whenever enough new objects survived (the
setup of those locks stalled the loop 38-68 ms, measured with
``bench/bench_memory.py``). Python 3.11 cannot collect incrementally, so the
policy is to keep what a full collection visits small, whatever the state:

1. **Per-entry state is invisible to the collector**, wherever the Manager
   runs. CPython never tracks bytes, str, int or float objects, nor a dict
   whose keys and values are all such (nor, once a collection has seen it,
   a tuple of them); a list, a set, a class instance or a dict holding any
   of those is tracked and visited, with everything it refers to. So a held
   lock is a ``bytes`` holder in a dict (:mod:`.locktable`), the near caches'
   stamps one mapped array (:mod:`.stamps`), a subscription an
   int in a dict (:mod:`.subscriptions`), a store or cache entry bytes or an
   int (:mod:`.namespace`), and the expiry wheel's references to expiring
   keys tuples of 64 (:class:`.namespace.Bucket`, visited once per 64
   keys); objects are kept for what is few (connections,
   sessions, lock waiters). Those tables then add nothing to a collection:
   the full collection above takes under 1 ms of the Manager's own objects
   (``tests/test_gc.py`` counts what the collector tracks per lock and
   subscription: none). This changes nothing outside the Manager's tables,
   so an embedded Manager (``runserver``, a test suite, a script) leaves the
   process's collector exactly as its user set it.

2. **The dedicated Manager process owns the collector** (:func:`adopt`): the
   lean master ``runcluster`` runs (:mod:`..serve.master`), which serves the
   Manager and gunicorn's arbiter and runs no project code, or a process
   started only to serve a Manager (``Manager(own_gc=True)``). There, once
   the state is restored and the server set up:

   * ``gc.collect()`` then ``gc.freeze()``: what exists then (the modules, the
     interpreter's own objects, a restored snapshot's) moves to the permanent
     generation, which no collection visits again. It is also what CPython's
     documentation advises before ``fork()`` without ``exec()``: the workers
     forked afterwards share those pages instead of copying them when a
     collection in the child would touch them.
   * the young generation's threshold goes from 700 to
     :data:`YOUNG_THRESHOLD` new container objects: a young collection
     visits only what was allocated since the last one and is still alive,
     and the Manager's requests allocate containers that die with the
     request, so most young collections found nothing; fewer of them cost
     less CPU, and each stays bounded by the threshold (under 1 ms). The older
     generations keep CPython's thresholds: full collections still come, so
     cycles (an exception kept with its traceback, say) are still freed.
   * each collection is timed (``gc.callbacks``), in CPU time of the thread
     it ran on, so that ``stats()["gc"]`` shows the longest and the last one
     per generation: what a full collection costs here, measured, not hoped.

   A child forked from that process (a gunicorn worker, which imports and
   runs the project) gets the thresholds back as they were before
   :func:`adopt` and no timing hook (step 1 of the package's one after-fork
   reset, see :mod:`django_clustershm.registry`); the frozen objects stay
   frozen there, as the documentation's recipe has it (they are the
   master's, shared, never the worker's own).

What a full collection still visits, and so what it costs: the Manager's
per-connection objects (a few thousand at 4,096 connections), lock waiters
(one object each: a million queued waits would cost ~100 ms), the lock timer
heap (an entry per leased lock or timed wait) and the expiry wheel's open
lists (under 64 references per bucket: a bucket per 1/64 s of the next second,
per second of the next minute and per minute beyond, so that timeouts spread
over days make many buckets of few keys). The wheel's references used to be
in plain lists: a full collection followed each, ~7-20 ms per million keys
with a timeout (1M cache keys, 300 s timeouts: 9.6 ms of CPU per full
collection before, 2.9 ms after, the rest being the interpreter's own).
"""

from __future__ import annotations

import gc
import os
import threading
import time

#: The young generation's threshold in the dedicated Manager process (CPython's default: 700).
YOUNG_THRESHOLD = 10_000

_lock = threading.Lock()
_owner_pid: int | None = None  # the process that adopted the policy
_saved: tuple[int, int, int] | None = None  # the thresholds before adopt()
_started = 0.0  # CPU time at the start of the collection under way
_longest = [0.0, 0.0, 0.0]  # seconds of CPU, per generation
_last = [0.0, 0.0, 0.0]
_count = [0, 0, 0]


def _on_gc(phase: str, info: dict) -> None:
    """gc.callbacks: time each collection (CPU time of the thread that runs it)."""
    global _started
    if phase == "start":
        _started = time.thread_time()
        return
    took = time.thread_time() - _started
    generation = info.get("generation", 2)
    _last[generation] = took
    _count[generation] += 1
    if took > _longest[generation]:
        _longest[generation] = took


def adopt(young_threshold: int = YOUNG_THRESHOLD) -> bool:
    """Make this process's garbage collector the Manager's (see the module's
    docstring). Only for a process that exists to serve a Manager; once per
    process (False if it was adopted already)."""
    global _owner_pid, _saved
    with _lock:
        if _owner_pid == os.getpid():
            return False
        if _owner_pid is not None:  # adopted by the parent, and this child did not reset: start afresh
            after_fork_in_child()
        _saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        young, older, oldest = _saved
        gc.set_threshold(max(young, young_threshold), older, oldest)
        gc.callbacks.append(_on_gc)
        _owner_pid = os.getpid()
        return True


def owned() -> bool:
    """Whether this process's collector follows the Manager's policy."""
    return _owner_pid == os.getpid()


def after_fork_in_child() -> None:
    """In a forked child of the process that adopted the policy: the
    thresholds as they were before, and no timing hook (a worker runs the
    project: the process's collector is its own again). Frozen objects stay
    frozen: they are the parent's."""
    global _owner_pid, _saved
    if _owner_pid is None or _owner_pid == os.getpid():
        return
    if _saved is not None:
        gc.set_threshold(*_saved)
    try:
        gc.callbacks.remove(_on_gc)
    except ValueError:
        pass
    _owner_pid = _saved = None
    _longest[:] = _last[:] = [0.0, 0.0, 0.0]
    _count[:] = [0, 0, 0]


def stats() -> dict:
    """What ``stats()["gc"]`` shows: whether the Manager owns the process's
    collector, its thresholds and frozen objects, and (when it owns it) the
    collections it timed, per generation: how many, the longest and the last,
    in ms of CPU."""
    figures: dict = {
        "owned": owned(),
        "thresholds": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
        "collections": [generation["collections"] for generation in gc.get_stats()],
    }
    if figures["owned"]:
        figures["timed"] = list(_count)
        figures["longest_ms"] = [round(t * 1000, 3) for t in _longest]
        figures["last_ms"] = [round(t * 1000, 3) for t in _last]
    return figures
