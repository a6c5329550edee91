"""Snapshots (#13): the engine's dump and restore with a fake clock, the file's
checks, the start-up policy, and the Manager's forked periodic writer.

Over HTTP, against ``runcluster`` (sessions, counters, TTLs across a restart,
bad files, a SIGKILLed master): ``tests/test_runcluster_snapshot.py``.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time

import pytest

import django_clustershm as clustershm
from django_clustershm.server import Engine, Manager
from django_clustershm.server import snapshot as S
from django_clustershm.server.namespace import INF, INLINE_MAX, Namespace, _unpack

from .helpers import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def engine(clock, **options) -> Engine:
    options.setdefault("max_store_bytes", 2**30)
    options.setdefault("max_total_cache_bytes", 2**32)
    return Engine(clock=clock, **options)


def cache(eng: Engine, name: str, max_bytes: int = 2**24) -> Namespace:
    return eng._space_for_write(name, [10**6, 3, max_bytes])[0]


def contents(space: Namespace) -> list:
    """(key, value, deadline) in dict (LRU) order."""
    return [(key, *_unpack(stored)) for key, stored in space.entries()]


def round_trip(eng: Engine, into: Engine, elapsed: float = 0.0) -> dict:
    spaces = [(name, max_bytes, list(batches)) for name, max_bytes, batches in eng.snapshot(max_entries=3)]
    return into.restore(spaces, elapsed)


def every_form(space: Namespace) -> None:
    """One entry of each packed form (see namespace._pack)."""
    big = b"B" * (INLINE_MAX + 100)
    space.set("small", b"s")
    space.set("small-ttl", b"st", ttl=50)
    space.set("big", big)
    space.set("big-ttl", big + b"t", ttl=60)
    space.set("int", 42)
    space.set("int-ttl", -7, ttl=70)
    space.set("not-a-pickle", b"\x80\x05garbage")  # opaque: never unpickled


# -- the engine, with a fake clock ---------------------------------------------------------


def test_a_round_trip_keeps_values_ttls_lru_order_bounds_and_accounting(clock):
    eng = engine(clock)
    every_form(eng.store)
    pages = cache(eng, "pages", 2**22)
    sessions = cache(eng, "sessions", 2**23)
    every_form(pages)
    for i in range(10):
        sessions.set(f"s{i}", b"v%d" % i, ttl=100 + i)
    sessions.get("s3")  # now the most recently used
    pages.get("small")
    new = engine(clock)
    counts = round_trip(eng, new)
    assert counts == {"restored": 24, "expired": 0, "left_out": 0, "newer": 0, "caches": 2, "caches_left_out": 0}
    for name, space in [("", eng.store), ("pages", pages), ("sessions", sessions)]:
        restored = new._space(name)
        assert [(k, v) for k, v, _ in contents(restored)] == [(k, v) for k, v, _ in contents(space)], name
        for (_, _, before), (_, _, after) in zip(contents(space), contents(restored), strict=True):
            assert after == pytest.approx(before) if before != INF else after == INF
        assert (restored.bytes, restored.timed, len(restored)) == (space.bytes, space.timed, len(space))
        assert restored.wheel.refs == restored.timed
        assert restored.max_bytes == space.max_bytes
    assert list(new.caches["sessions"].iter_keys())[-1] == "s3"
    assert list(new.caches["pages"].iter_keys())[-1] == "small"


def test_ttls_keep_running_from_what_was_left_and_the_wheel_reaps_them(clock):
    eng = engine(clock)
    eng.store.set("soon", b"1", ttl=10)
    eng.store.set("gone", b"2", ttl=3)
    eng.store.set("forever", b"3")
    sessions = cache(eng, "sessions")
    sessions.set("s", b"4", ttl=10)
    clock.now += 1  # 9 s left for "soon" and "s"
    new = engine(clock)
    counts = round_trip(eng, new, elapsed=4)  # 4 s pass between the write and the restore
    assert counts["restored"] == 3 and counts["expired"] == 1
    assert new.store.get("gone") is None and new.store.ttl("soon") == pytest.approx(5)
    clock.now += 4.99
    assert new.store.get("soon") == b"1" and new.caches["sessions"].get("s") == b"4"
    clock.now += 0.02
    # Reclaimed by the wheel, without a read, as any expiring entry.
    assert new.store.reap() == ["soon"] and new.caches["sessions"].reap() == ["s"]
    assert new.store.timed == 0 and new.store.get("forever") == b"3"
    assert new.store.wheel.refs == 0


def test_expired_entries_are_not_written_and_the_snapshot_changes_nothing(clock):
    eng = engine(clock)
    events = []
    eng.store.on_event = lambda *event: events.append(event)
    eng.store.set("old", b"1", ttl=1)
    eng.store.set("new", b"2", ttl=100)
    events.clear()
    clock.now += 2
    hits, length = eng.store.hits, len(eng.store)
    assert [k for k, _, _ in eng.store.items_for_snapshot()] == ["new"]
    assert (eng.store.hits, len(eng.store), events) == (hits, length, [])  # "old" is left for the wheel


def test_keys_written_before_the_restore_win_and_stay_most_recent(clock):
    eng = engine(clock)
    pages = cache(eng, "pages")
    for key in "abc":
        pages.set(key, key.encode())
    eng.store.set("booted_by", 1)
    new = engine(clock)
    cache(new, "pages").set("b", b"newer")  # start-up code, run before the restore
    new.store.set("booted_by", 2)
    assert round_trip(eng, new)["newer"] == 2
    assert contents(new.caches["pages"]) == [("a", b"a", INF), ("c", b"c", INF), ("b", b"newer", INF)]
    assert new.store.get("booted_by") == 2
    assert new.caches["pages"].bytes == sum(Namespace._cost(k, v) for k, v in new.caches["pages"].entries())


def test_the_store_budget_and_the_cache_bounds_apply_on_restore(clock):
    eng = engine(clock, max_cache_bytes=2**24)
    for i in range(100):
        eng.store.set(f"k{i:03d}", b"x" * 100)
    big = cache(eng, "big", 2**24)
    for i in range(100):
        big.set(f"c{i:03d}", b"y" * 1000)
    small = engine(clock, max_store_bytes=eng.store.bytes // 2, max_cache_bytes=big.bytes // 2)
    counts = round_trip(eng, small)
    assert 0 < len(small.store) < 100 and small.store.bytes <= small.store.max_bytes
    restored = small.caches["big"]
    assert restored.max_bytes == big.bytes // 2 and restored.bytes <= restored.max_bytes
    assert list(restored.iter_keys())[-1] == "c099"  # the least recently used were evicted first
    assert counts["left_out"] == 200 - len(small.store) - len(restored)


def test_a_cache_that_no_longer_fits_is_left_out(clock, caplog):
    eng = engine(clock)
    cache(eng, "a", 2**21).set("k", b"1")
    new = engine(clock, max_total_cache_bytes=2**19)
    with caplog.at_level(logging.ERROR, logger="django_clustershm"):
        counts = round_trip(eng, new)
    assert counts["caches_left_out"] == 1 and "a" not in new.caches
    assert "cache 'a' is not restored" in caplog.text


# -- the file ---------------------------------------------------------------------------------


@pytest.fixture
def snap_path(tmp_path):
    return str(tmp_path / "state.snap")


@pytest.fixture
def written(clock, snap_path):
    eng = engine(clock)
    every_form(eng.store)
    pages = cache(eng, "pages")
    for i in range(5000):  # more than one batch
        pages.set(f"p{i}", b"v" * (i % 50), ttl=300)
    S.write(eng, snap_path)
    return eng


def test_the_file_round_trips_with_mode_0600_and_no_temporary_left(written, snap_path, clock):
    old_umask = os.umask(0)
    try:
        S.write(written, snap_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(snap_path).st_mode) == 0o600
    assert os.listdir(os.path.dirname(snap_path)) == ["state.snap"]
    snap = S.read(snap_path)
    assert snap.entries == 7 + 5000 and snap.age < 5
    new = engine(clock)
    new.restore(snap.spaces)  # the fake clock did not move: no time passed
    assert contents(new.store) == contents(written.store)
    assert len(new.caches["pages"]) == 5000 and new.caches["pages"].bytes == written.caches["pages"].bytes


def test_truncated_files_are_refused(written, snap_path):
    with open(snap_path, "rb") as fh:
        data = fh.read()
    for size in (0, 3, 20, S.HEADER_SIZE, 100, len(data) // 2, len(data) - S.TRAILER_SIZE, len(data) - 1):
        with open(snap_path, "wb") as fh:
            fh.write(data[:size])
        with pytest.raises(S.SnapshotError, match=r"is truncated \("):
            S.read(snap_path)


def test_corrupt_files_are_refused(written, snap_path):
    with open(snap_path, "rb") as fh:
        data = bytearray(fh.read())

    def bad(position: int, byte: int) -> bytes:
        copy = bytearray(data)
        copy[position] = byte
        return bytes(copy)

    cases = [
        (bad(len(data) // 2, data[len(data) // 2] ^ 0x40), r"is corrupt \(its checksum does not match\)"),
        (bad(S.HEADER_SIZE, 0xC1), r"is corrupt \(its checksum does not match\)"),
        (bad(len(data) - 9, data[len(data) - 9] ^ 1), r"is corrupt \(its checksum does not match\)"),  # the count
        (bad(len(data) - 5, data[len(data) - 5] ^ 1), r"is corrupt \(its checksum does not match\)"),  # the crc
        (b"PK\x03\x04" + bytes(data[4:]), r"is not a django-clustershm snapshot"),
        (bytes(data[:8]) + struct.pack("<H", 9) + bytes(data[10:]), r"is in format version 9; this version reads 1"),
    ]
    for content, message in cases:
        with open(snap_path, "wb") as fh:
            fh.write(content)
        with pytest.raises(S.SnapshotError, match=message):
            S.read(snap_path)


def test_fencing_tokens_keep_growing_across_a_restore(clock, snap_path):
    eng = engine(clock)
    session = eng.open_session()
    for _ in range(5):
        token, fence = eng.locks.acquire(session, 0, "k", None, 0)
        eng.locks.release("k", token)
    S.write(eng, snap_path)
    new = engine(clock)
    new.restore_meta(S.read(snap_path).meta)
    assert new.locks.acquire(new.open_session(), 0, "k", None, 0)[1] == fence + 1


def test_a_file_with_a_valid_checksum_but_malformed_records_is_refused(clock, snap_path, monkeypatch):
    """Checked record by record before anything is restored (a writer's bug, not a disk's)."""
    eng = engine(clock)
    eng.store.set("k", b"v")
    monkeypatch.setattr(Engine, "snapshot", lambda self, *a: iter([("", None, iter([[1, b"v", None]]))]))
    S.write(eng, snap_path)
    with pytest.raises(S.SnapshotError, match=r"is corrupt \(an entry is malformed\)"):
        S.read(snap_path)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_file_writable_by_group_or_others_is_refused(written, snap_path, mode):
    os.chmod(snap_path, mode)
    with pytest.raises(S.SnapshotError, match=r"is writable by its group or by others \(mode 0"):
        S.read(snap_path)
    os.chmod(snap_path, 0o640)  # readable is not writable
    S.read(snap_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another uid needs root")
def test_a_file_of_another_uid_is_refused(written, snap_path):
    os.chown(snap_path, 65534, 65534)
    with pytest.raises(
        S.SnapshotError, match=r"is owned by uid 65534, not by this server's uid 0, and it holds pickles"
    ):
        S.read(snap_path)


def test_a_symlink_or_a_directory_is_refused(written, snap_path, tmp_path):
    link = str(tmp_path / "link.snap")
    os.symlink(snap_path, link)
    with pytest.raises(S.SnapshotError, match="is a symbolic link"):
        S.read(link)
    with pytest.raises(S.SnapshotError, match="is not a regular file"):
        S.read(str(tmp_path))


# -- the settings and the start-up policy --------------------------------------------------


def test_the_setting_is_checked_in_one_sentence(tmp_path):
    path = str(tmp_path / "s.snap")
    assert S.config_from_settings(None) is None
    assert S.config_from_settings({"PATH": path}) == S.SnapshotConfig(path, None, "start_empty")
    assert S.config_from_settings({"PATH": path, "INTERVAL": 60, "ON_ERROR": "refuse"}).interval == 60.0
    for value, message in [
        ({"INTERVAL": 5}, r'\["PATH"\] is required'),
        ({"PATH": path, "INTERVAL": 0}, r'\["INTERVAL"\] is a number of seconds above 0'),
        ({"PATH": path, "INTERVAL": "60"}, r'\["INTERVAL"\]'),
        ({"PATH": path, "INTERVAL": True}, r'\["INTERVAL"\]'),
        ({"PATH": path, "ON_ERROR": "ignore"}, r'\["ON_ERROR"\] is "start_empty" or "refuse"'),
        ({"PATH": path, "PERIOD": 5}, r"unknown keys \['PERIOD'\]"),
        ({"PATH": str(tmp_path / "nope" / "s.snap")}, r"directory .*nope does not exist"),
        ("/var/x.snap", "is a dict"),
    ]:
        with pytest.raises(S.SnapshotRefused, match=message):
            S.config_from_settings(value)


def test_a_bad_file_starts_empty_by_default_and_is_kept_aside(written, snap_path, clock, caplog):
    with open(snap_path, "r+b") as fh:
        fh.truncate(1000)
    config = S.config_from_settings({"PATH": snap_path})
    eng = engine(clock)
    with caplog.at_level(logging.INFO, logger="django_clustershm"):
        assert S.restore_at_start(eng, config) is None
    assert len(eng.store) == 0
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "is truncated" in error.getMessage() and "; starting empty (it was moved to " in error.getMessage()
    (aside,) = [n for n in os.listdir(os.path.dirname(snap_path)) if n.startswith("state.snap.bad-")]
    assert os.path.getsize(os.path.join(os.path.dirname(snap_path), aside)) == 1000
    assert not os.path.exists(snap_path)  # the next start has no bad file: never a crash loop


def test_a_bad_file_with_refuse_stops_the_start(written, snap_path, clock):
    os.chmod(snap_path, 0o666)
    config = S.config_from_settings({"PATH": snap_path, "ON_ERROR": "refuse"})
    with pytest.raises(
        S.SnapshotRefused, match=r'writable by its group .*; not starting \(.*"ON_ERROR"\] is "refuse"\)'
    ):
        S.restore_at_start(engine(clock), config)
    assert os.path.exists(snap_path)  # left where it is, for the operator


def test_start_restores_and_removes_dead_writers_temporary_files(written, snap_path, clock, caplog):
    dead = S.temp_path(snap_path, 2**22 + 12345)  # above any pid_max: no such process
    with open(dead, "wb") as fh:
        fh.write(b"half a snapshot")
    eng = engine(clock)
    with caplog.at_level(logging.INFO, logger="django_clustershm"):
        counts = S.restore_at_start(eng, S.config_from_settings({"PATH": snap_path}))
    assert counts["restored"] == 5007 and len(eng.store) == 7
    assert "restored 5007 entries (the store and 1 cache) from " in caplog.text
    assert not os.path.exists(dead)
    assert S.restore_at_start(engine(clock), S.config_from_settings({"PATH": snap_path + "-none"})) is None


# -- the Manager: the forked periodic writer and the last snapshot at stop -----------------------


def snapshot_manager(path: str, interval: float | None = None, **options) -> Manager:
    return Manager(snapshot=S.SnapshotConfig(path, interval), **options).start()


def test_the_manager_writes_periodically_and_at_stop(snap_path):
    manager = snapshot_manager(snap_path, interval=0.5)
    client = clustershm.connect(manager.address, manager.secret)
    try:
        client.set_many({f"k{i}": i for i in range(1000)})
        client.cache("pages", max_entries=100).set("p", b"page", 300)
        snapshots = manager.snapshots  # read here, not by stats(): a request is not idle
        wait_until(lambda: (snapshots.last or {}).get("entries") == 1001, timeout=10, message="a periodic snapshot")
        stats = client.stats()["snapshot"]
        assert stats["path"] == snap_path and stats["interval"] == 0.5 and stats["last_error"] is None
        last = stats["last"]
        assert last["bytes"] == os.path.getsize(snap_path)
        assert last["max_stall_ms"] >= last["fork_ms"] > 0
        assert S.read(snap_path).entries == 1001
        # The stats() call above was a request: one more snapshot at most, seen
        # done at the loop's next check (once a second).
        time.sleep(2.5)
        written = snapshots.written
        time.sleep(2.5)
        assert snapshots.written == written  # an idle Manager is not written again
        client.set("late", b"x")
    finally:
        client.close()
        manager.close()
    snap = S.read(snap_path)
    assert snap.entries == 1002  # the stop wrote what came after the last periodic one
    assert sorted(os.listdir(os.path.dirname(snap_path))) == ["state.snap"]


def test_the_writer_child_runs_none_of_the_packages_after_fork_steps(snap_path):
    """Without the guard, the child would reconnect this process's client and
    subscribe its listener again (through locks another thread may have held)."""
    manager = snapshot_manager(snap_path)
    clustershm.configure(manager.address, manager.secret)
    try:
        handle = clustershm.listen("flag", lambda *event: None)
        clustershm.set("flag", 1)
        sessions = manager.engine._next_sid  # the id of the next connection the Manager will accept
        manager.request_snapshot()
        wait_until(lambda: manager.snapshots.written == 1, timeout=10, message="a snapshot")
        assert manager.engine._next_sid == sessions  # the child connected to nothing
        assert {c["pid"] for c in clustershm.stats()["clients"]} == {os.getpid()}
        handle.cancel()
    finally:
        clustershm.configure(None)
        manager.close()


def test_a_failing_writer_is_reported_and_leaves_the_old_file(snap_path, caplog):
    manager = snapshot_manager(snap_path)
    client = clustershm.connect(manager.address, manager.secret)
    try:
        client.set("k", b"v")
        os.mkdir(snap_path)  # rename() over a directory fails
        with caplog.at_level(logging.ERROR, logger="django_clustershm"):
            manager.request_snapshot()
            wait_until(lambda: client.stats()["snapshot"]["failed"] == 1, timeout=10, message="a failed snapshot")
        error = client.stats()["snapshot"]["last_error"]
        assert error.startswith(f"the periodic snapshot to {snap_path} failed: ") and "Is a directory" in error
        assert "the periodic snapshot" in caplog.text
        assert os.listdir(os.path.dirname(snap_path)) == ["state.snap"]  # its temporary file removed
        os.rmdir(snap_path)
    finally:
        client.close()
        manager.close()
    assert S.read(snap_path).entries == 1


def test_a_stop_while_a_writer_is_busy_stops_it_and_writes_the_last_state(snap_path):
    eng = Engine(max_store_bytes=2**32)
    for i in range(300_000):
        eng.store.set(f"key:{i:07d}", b"x" * 20)
    manager = Manager(engine=eng, snapshot=S.SnapshotConfig(snap_path)).start()
    manager.request_snapshot()
    wait_until(lambda: manager.snapshots.child is not None, timeout=10, message="a writer")
    manager.close()
    assert manager.snapshots.child is None
    assert S.read(snap_path).entries == 300_000
    assert os.listdir(os.path.dirname(snap_path)) == ["state.snap"]
