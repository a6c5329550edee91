"""Snapshots: the store and the caches in a file, so that state outlives a restart (#13).

Opt in with ``CLUSTERSHM["SNAPSHOT"] = {"PATH": ..., "INTERVAL": seconds or None}``:

* at start, :func:`restore_at_start` puts the file's entries back into the
  engine before the Manager serves and before any worker is forked;
* on a graceful stop the Manager writes the file (:func:`write`) once its
  loop has stopped;
* with an ``INTERVAL``, :class:`Periodic` also writes it every INTERVAL
  seconds from a **forked writer**, as Redis's ``BGSAVE`` does: the loop
  thread forks between two rounds and goes on serving, and the child writes
  its copy-on-write image of the engine and exits. The fork is all the loop
  waits for (page tables: a few ms per GB). The child is a fork of a
  threaded process: it takes no lock (another thread may have held it at the
  fork), logs nothing through :mod:`logging`, runs none of the package's
  after-fork steps (see :func:`in_writer_child`), serializes with msgpack,
  writes with ``os`` calls, reports on a pipe and leaves with ``os._exit``.

The Manager never unpickles: values are written as the opaque bytes (or
ints) they are. Locks, listeners and near-cache tracking are not written:
their holders are gone after a restart. The last fencing token is, so that
fences keep growing across restarts.

The file (version 1)::

    header   24 bytes  b"CSHMSNAP", u16 version, u16 flags (0), u32 0, f64 wall time of the write
    records  msgpack   a map of what is not an entry ({"fence": the last fencing token});
                       then for each namespace: [name, max_bytes] (the store: "", nil), then its
                       entries in batches [key, value, ttl, key, value, ttl, ...] (ttl: the
                       seconds left at the write, or nil; least recently used first), then nil
    trailer  24 bytes  b"CSHM-END", u64 entries, u32 crc32 of every byte before this field, u32 0

It is written to a temporary file in the same directory (mode 0600), fsynced,
renamed over ``PATH``, and the directory fsynced: a crash leaves the old file
or the new one, never half of one. Reading checks, before anything is
restored: that it is a regular file owned by the server's uid and writable
by no one else (it holds pickles the workers will load: whoever can write it
can run code in them), the magic, the version, the trailer (a truncated file
has none) and the checksum. Remaining ttls keep running across the restart:
the wall-clock time between the write and the restore is taken off them,
and what ran out meanwhile is not restored.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from .engine import Engine

logger = logging.getLogger("django_clustershm.snapshot")

MAGIC = b"CSHMSNAP"
END = b"CSHM-END"
VERSION = 1
_HEADER = struct.Struct("<8sHHId")
_TRAILER = struct.Struct("<8sQII")
HEADER_SIZE = _HEADER.size
TRAILER_SIZE = _TRAILER.size
_CRC_AT = 16  # the checksum's offset in the trailer: it covers the magic and the count before it
#: Entries and value bytes per batch record: bounded records, and a reader
#: that never holds more than one of them (plus one value) undecoded.
BATCH_ENTRIES = 4096
BATCH_BYTES = 1 << 20
#: Bytes gathered before each write() and checksum update.
_CHUNK = 1 << 20
#: The largest record a reader accepts: a batch of BATCH_BYTES and one value
#: of the largest frame (64 MiB), with room to spare.
_MAX_RECORD = 256 << 20
#: What ON_ERROR may be, the default first.
ON_ERROR = ("start_empty", "refuse")
#: The exit status of a server that refuses to start over its snapshot
#: (EX_CONFIG): systemd's ``RestartPreventExitStatus=78`` keeps a supervisor
#: from restarting it in a loop.
EXIT_REFUSED = 78
#: Signals whose handlers (the arbiter's) a writer child resets to the default.
_RESET_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTTIN", "SIGTTOU", "SIGWINCH")
    if hasattr(signal, name)
)


class SnapshotError(Exception):
    """A snapshot that cannot be used, or snapshot settings that cannot work; its message is one sentence."""


class SnapshotRefused(SnapshotError):
    """The server must not start (ON_ERROR is "refuse", or the settings are wrong)."""


@dataclass(frozen=True)
class SnapshotConfig:
    """``CLUSTERSHM["SNAPSHOT"]``, checked (see :func:`config_from_settings`)."""

    path: str
    interval: float | None = None
    on_error: str = "start_empty"


def config_from_settings(value) -> SnapshotConfig | None:
    """The SNAPSHOT setting, checked: None when off; SnapshotRefused, in one sentence, when it cannot work."""
    if not value:
        return None
    where = 'CLUSTERSHM["SNAPSHOT"]'
    if not isinstance(value, dict):
        raise SnapshotRefused(f'{where} is a dict such as {{"PATH": "/var/lib/mysite/clustershm.snap"}}')
    unknown = set(value) - {"PATH", "INTERVAL", "ON_ERROR"}
    if unknown:
        raise SnapshotRefused(f"{where} has unknown keys {sorted(unknown)}; it takes PATH, INTERVAL and ON_ERROR")
    path = value.get("PATH")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise SnapshotRefused(f'{where}["PATH"] is required: the file to keep the state in')
    path = os.path.abspath(os.fspath(path))
    interval = value.get("INTERVAL")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < float("inf")
    ):
        raise SnapshotRefused(f'{where}["INTERVAL"] is a number of seconds above 0, or None; not {interval!r}')
    on_error = value.get("ON_ERROR", ON_ERROR[0])
    if on_error not in ON_ERROR:
        raise SnapshotRefused(f'{where}["ON_ERROR"] is "start_empty" or "refuse"; not {on_error!r}')
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise SnapshotRefused(f"the snapshot's directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SnapshotRefused(
            f"the snapshot's directory {directory} is not writable by this server (uid {os.geteuid()})"
        )
    return SnapshotConfig(path, None if interval is None else float(interval), on_error)


# -- writing ---------------------------------------------------------------------------


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def dump(engine: Engine, fd: int, written_at: float | None = None) -> tuple[int, int]:
    """Write the engine's snapshot into ``fd``; return (entries, bytes).

    ``os.write`` and C code only (msgpack, zlib): a forked writer may call it.
    """
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    buf = bytearray(_HEADER.pack(MAGIC, VERSION, 0, 0, time.time() if written_at is None else written_at))
    crc = 0
    size = 0
    entries = 0
    buf += pack(engine.snapshot_meta())
    for name, max_bytes, batches in engine.snapshot(BATCH_ENTRIES, BATCH_BYTES):
        buf += pack([name, max_bytes])
        for batch in batches:
            buf += pack(batch)
            entries += len(batch) // 3
            if len(buf) >= _CHUNK:
                crc = zlib.crc32(buf, crc)
                _write_all(fd, buf)
                size += len(buf)
                buf.clear()
        buf += pack(None)
    trailer = _TRAILER.pack(END, entries, 0, 0)
    crc = zlib.crc32(trailer[:_CRC_AT], zlib.crc32(buf, crc))
    buf += _TRAILER.pack(END, entries, crc, 0)
    _write_all(fd, buf)
    return entries, size + len(buf)


def temp_path(path: str, pid: int | None = None) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid() if pid is None else pid}")


def write(engine: Engine, path: str) -> tuple[int, int]:
    """Write the engine's snapshot to ``path`` atomically; return (entries, bytes).

    A temporary file in the same directory, mode 0600, fsynced, renamed over
    ``path``, then the directory fsynced. ``os`` calls only (a forked writer
    calls it). On any error the temporary file is removed and ``path`` is as
    it was.
    """
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a writer of an earlier process that had this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            entries, size = dump(engine, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return entries, size


# -- reading ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A snapshot read and checked: when it was written (wall clock) and its namespaces."""

    path: str
    written_at: float
    entries: int
    #: (name, max_bytes, batches) as Engine.restore takes them
    spaces: list[tuple[str, int | None, list[list]]]
    #: what is not an entry (Engine.restore_meta)
    meta: dict

    @property
    def age(self) -> float:
        """Seconds since it was written (0 if the wall clock went back)."""
        return max(0.0, time.time() - self.written_at)


class _Limited:
    """A file's bytes up to ``end`` (the trailer is not msgpack)."""

    def __init__(self, fh, left: int) -> None:
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data


def _why_unsafe(st: os.stat_result, path: str) -> str | None:
    uid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        return f"the snapshot {path} is not a regular file"
    if st.st_uid != uid:
        return (
            f"the snapshot {path} is owned by uid {st.st_uid}, not by this server's uid {uid}, "
            "and it holds pickles the workers would load: refused"
        )
    if st.st_mode & 0o022:
        return (
            f"the snapshot {path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o}), "
            "and it holds pickles the workers would load: refused (chmod 600 it if you trust it)"
        )
    return None


def read(path: str) -> Snapshot:
    """Read and check the snapshot at ``path``: FileNotFoundError if there is
    none, SnapshotError (one sentence) if it is unsafe, truncated, corrupt or
    of another version. Nothing is restored from a file that fails a check."""
    try:
        # O_NONBLOCK: a FIFO put there must not hang the start (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise SnapshotError(f"the snapshot {path} is a symbolic link: refused") from None
        raise SnapshotError(f"the snapshot {path} cannot be read: {exc.strerror}") from None
    st = os.fstat(fd)
    why = _why_unsafe(st, path)
    if why:
        os.close(fd)
        raise SnapshotError(why)
    with os.fdopen(fd, "rb") as fh:
        size = st.st_size
        head = fh.read(HEADER_SIZE)
        if not head or (len(head) < len(MAGIC) and MAGIC.startswith(head)):
            raise SnapshotError(f"the snapshot {path} is truncated ({size} bytes)")
        if head[: len(MAGIC)] != MAGIC:
            raise SnapshotError(f"{path} is not a django-clustershm snapshot (it does not start with {MAGIC!r})")
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise SnapshotError(f"the snapshot {path} is truncated ({size} bytes)")
        _, version, _, _, written_at = _HEADER.unpack(head)
        if version != VERSION:
            raise SnapshotError(f"the snapshot {path} is in format version {version}; this version reads {VERSION}")
        fh.seek(size - TRAILER_SIZE)
        trailer = fh.read(TRAILER_SIZE)
        end, entries, crc, _ = _TRAILER.unpack(trailer)
        if end != END:
            raise SnapshotError(f"the snapshot {path} is truncated (its end marker is missing; {size} bytes)")
        fh.seek(0)
        computed, left = 0, size - TRAILER_SIZE
        while left:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise SnapshotError(f"the snapshot {path} is truncated (it shrank while being read)")
            computed = zlib.crc32(chunk, computed)
            left -= len(chunk)
        if zlib.crc32(trailer[:_CRC_AT], computed) != crc:
            raise SnapshotError(f"the snapshot {path} is corrupt (its checksum does not match)")
        fh.seek(HEADER_SIZE)
        try:
            meta, spaces = _parse(_Limited(fh, size - TRAILER_SIZE - HEADER_SIZE), entries)
        except SnapshotError as exc:
            raise SnapshotError(f"the snapshot {path} is corrupt ({exc})") from None
        except Exception as exc:  # msgpack's errors, a str that is not UTF-8
            raise SnapshotError(f"the snapshot {path} is corrupt ({type(exc).__name__}: {exc})") from None
    return Snapshot(path, written_at, entries, spaces, meta)


def _parse(source: _Limited, entries: int) -> tuple[dict, list[tuple[str, int | None, list[list]]]]:
    """The records, every one checked before anything is restored."""
    unpacker = msgpack.Unpacker(source, raw=False, use_list=True, read_size=_CHUNK, max_buffer_size=_MAX_RECORD)
    try:
        meta = next(unpacker)
    except StopIteration:
        meta = None
    if type(meta) is not dict:
        raise SnapshotError("its first record is not a map")
    spaces: list[tuple[str, int | None, list[list]]] = []
    current: list[list] | None = None
    count = 0
    names = set()
    for record in unpacker:
        if current is None:
            if (
                type(record) is not list
                or len(record) != 2
                or type(record[0]) is not str
                or not (record[1] is None or type(record[1]) is int)
            ):
                raise SnapshotError("a namespace record is malformed")
            if record[0] in names:
                raise SnapshotError(f"namespace {record[0]!r} appears twice")
            names.add(record[0])
            current = []
            spaces.append((record[0], record[1], current))
        elif record is None:
            current = None
        else:
            if type(record) is not list or len(record) % 3:
                raise SnapshotError("a batch record is malformed")
            for i in range(0, len(record), 3):
                key, value, ttl = record[i], record[i + 1], record[i + 2]
                if (
                    type(key) is not str
                    or type(value) not in (bytes, int)
                    or not (ttl is None or type(ttl) is float or type(ttl) is int)
                ):
                    raise SnapshotError("an entry is malformed")
            current.append(record)
            count += len(record) // 3
    if current is not None:
        raise SnapshotError("the last namespace has no end")
    if count != entries:
        raise SnapshotError(f"{count} entries where its trailer says {entries}")
    return meta, spaces


# -- at start ---------------------------------------------------------------------------


def _move_aside(path: str) -> str | None:
    """Keep a file that could not be restored for an operator to look at (the
    next snapshot would replace it); its new name, or None if it cannot move."""
    aside = f"{path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        os.rename(path, aside)
    except OSError:
        return None
    return aside


def _remove_stale_temps(path: str) -> None:
    """Temporary files of writers that died (a SIGKILLed server's), not of a live process."""
    directory, name = os.path.split(path)
    prefix = f".{name}.tmp-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not entry.startswith(prefix) or not entry[len(prefix) :].isdigit():
            continue
        pid = int(entry[len(prefix) :])
        try:
            os.kill(pid, 0)
            continue  # a live writer (of another server with the same PATH?): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        full = os.path.join(directory, entry)
        try:
            if os.lstat(full).st_uid == os.geteuid():
                os.unlink(full)
        except OSError:
            pass


def restore_at_start(engine: Engine, config: SnapshotConfig) -> dict | None:
    """Restore ``config.path`` into ``engine`` (before the Manager serves).

    No file: nothing to do. A file that fails a check: logged as an error and
    moved aside (``PATH.bad-<time>``), and the server starts empty (ON_ERROR
    ``"start_empty"``, the default); or :class:`SnapshotRefused` (``"refuse"``).
    Returns the counts of :meth:`Engine.restore`, or None.
    """
    _remove_stale_temps(config.path)
    started = time.monotonic()
    try:
        snap = read(config.path)
    except FileNotFoundError:
        logger.info("django-clustershm: no snapshot at %s yet; starting empty", config.path)
        return None
    except SnapshotError as exc:
        if config.on_error == "refuse":
            raise SnapshotRefused(f'{exc}; not starting (CLUSTERSHM["SNAPSHOT"]["ON_ERROR"] is "refuse")') from None
        aside = _move_aside(config.path)
        kept = f"it was moved to {aside}" if aside else "it could not be moved aside"
        logger.error("django-clustershm: %s; starting empty (%s)", exc, kept)
        return None
    age = snap.age
    engine.restore_meta(snap.meta)
    counts = engine.restore(snap.spaces, age)
    logger.info(
        "django-clustershm: restored %d entries (the store and %d cache%s) from %s, written %.1fs ago, in %.2fs; "
        "not restored: %d expired meanwhile, %d written since by start-up code, %d over a budget",
        counts["restored"],
        counts["caches"],
        "" if counts["caches"] == 1 else "s",
        config.path,
        age,
        time.monotonic() - started,
        counts["expired"],
        counts["newer"],
        counts["left_out"],
    )
    return counts


# -- the periodic writer ---------------------------------------------------------------------

#: The thread that is forking a writer (0: none), so that the package's
#: after-fork steps can tell the writer child apart (see in_writer_child).
_forking = 0


def in_writer_child() -> bool:
    """True in a snapshot writer child (from inside ``os.fork()``'s after-fork
    hooks on): the package's after-fork steps must not run there (they close
    and reconnect clients, and re-subscribe listeners, through locks that
    another thread of the parent may have held at the fork). The child's one
    thread is the one that forked, with the same id; any other thread forking
    at the same time (the arbiter spawning a worker) has another."""
    return _forking != 0 and _forking == threading.get_ident()


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


def _writer_child(engine: Engine, path: str, report: int) -> None:  # pragma: no cover - runs in the child
    """The forked writer: serialize and write with os-level calls, report on ``report``, ``os._exit``."""
    code = 1
    try:
        gc.disable()  # the copy-on-write image stays shared, and nothing here is a cycle
        for sig in _RESET_SIGNALS:  # a SIGTERM to the group ends the writer, not the arbiter's handler
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
        # Hold nothing of the server's: its listening sockets and its clients'
        # connections must close with the master, whatever this child does.
        os.closerange(3, report)
        os.closerange(report + 1, _max_fd())
        started = time.monotonic()
        entries, size = write(engine, path)
        _write_all(report, f"ok {entries} {size} {time.monotonic() - started:.6f}".encode())
        code = 0
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            _write_all(report, f"error {exc}".encode(errors="replace")[:4000])
    finally:
        os._exit(code)


class _Child:
    __slots__ = ("at", "fork_ms", "message", "pid", "report", "stall", "started")

    def __init__(self, pid: int, report: int, fork_ms: float) -> None:
        self.pid = pid
        self.report = report
        self.fork_ms = fork_ms
        self.started = time.monotonic()
        self.at = time.time()
        self.message = b""
        self.stall = 0.0  # the loop's longest round while this child wrote


class Periodic:
    """A Manager's snapshots: every ``interval`` seconds by a forked writer
    (:meth:`tick`, from the loop, between rounds), and the last one, in this
    process, when it stops (:meth:`close`)."""

    def __init__(self, engine: Engine, config: SnapshotConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.child: _Child | None = None
        self.next_due = None if config.interval is None else clock() + config.interval
        self._ops = -1  # engine.ops at the last start: an idle server is not written again
        self._zombies: list[int] = []
        self.written = 0
        self.failed = 0
        self.last: dict | None = None
        self.last_error: str | None = None
        self.max_fork_ms = 0.0
        #: True while the final snapshot is being written (Manager.close waits for it).
        self.writing_final = False

    # -- from the loop ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """About once a second, on the loop: see how the writer is doing, and start one when due."""
        if self.child is not None:
            self._poll()
        if self._zombies:
            self._reap()
        if self.next_due is not None and now >= self.next_due:
            self.next_due = now + (self.config.interval or 0.0)
            if self.child is None and self.engine.ops != self._ops:
                self.start()

    def start(self) -> bool:
        """Fork a writer now (unless one is writing); whether one was started."""
        global _forking
        if self.child is not None:
            return False
        self._ops = self.engine.ops
        r, w = os.pipe()
        _forking = threading.get_ident()
        t0 = time.perf_counter()
        try:
            pid = os.fork()
        except OSError as exc:
            _forking = 0
            os.close(r)
            os.close(w)
            self._failed(f"cannot fork a snapshot writer: {exc}")
            return False
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            _writer_child(self.engine, self.config.path, w)
        _forking = 0
        fork_ms = (time.perf_counter() - t0) * 1000
        os.close(w)
        os.set_blocking(r, False)
        self.child = _Child(pid, r, fork_ms)
        self.max_fork_ms = max(self.max_fork_ms, fork_ms)
        return True

    def note_round(self, seconds: float) -> None:
        """The loop's round took ``seconds`` while a writer was running."""
        child = self.child
        if child is not None and seconds > child.stall:
            child.stall = seconds

    def _poll(self, block: float = 0.0) -> None:
        child = self.child
        assert child is not None
        deadline = time.monotonic() + block
        while True:
            try:
                data = os.read(child.report, 65536)
            except BlockingIOError:
                if block and time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                return
            if not data:
                break
            child.message += data
        os.close(child.report)
        self.child = None
        self._zombies.append(child.pid)
        self._reap()
        message = child.message.decode(errors="replace")
        if message.startswith("ok "):
            entries, size, seconds = message.split()[1:4]
            self.written += 1
            self.last_error = None
            self.last = {
                "at": child.at,
                "entries": int(entries),
                "bytes": int(size),
                "seconds": round(float(seconds), 6),
                "fork_ms": round(child.fork_ms, 3),
                "max_stall_ms": round(child.stall * 1000, 3),
            }
            logger.debug(
                "snapshot: %d entries (%d bytes) written to %s in %.3fs by pid %d (fork %.1f ms)",
                int(entries),
                int(size),
                self.config.path,
                float(seconds),
                child.pid,
                child.fork_ms,
            )
        else:
            with contextlib.suppress(OSError):
                os.unlink(temp_path(self.config.path, child.pid))
            reason = message[6:] if message.startswith("error ") else "the writer died without a word"
            self._failed(f"the periodic snapshot to {self.config.path} failed: {reason}")

    def _reap(self) -> None:
        for pid in list(self._zombies):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (gunicorn's arbiter reaps every child)
                done = pid
            if done:
                self._zombies.remove(pid)

    def _failed(self, message: str) -> None:
        self.failed += 1
        self.last_error = message
        logger.error("django-clustershm: %s", message)

    # -- at the end ---------------------------------------------------------------------------

    def stop_writer(self) -> None:
        """Stop a periodic writer that is still writing (its file would be older than the final one)."""
        child = self.child
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        self._poll(block=10.0)  # its pipe closes when it is gone
        if self.child is not None:  # pragma: no cover - a child that outlived SIGKILL for 10 s
            os.close(child.report)
            self.child = None
        with contextlib.suppress(OSError):
            os.unlink(temp_path(self.config.path, child.pid))

    def close(self, final: bool = True) -> None:
        """Write the last snapshot (the loop has stopped: nothing changes any more)."""
        self.writing_final = final
        try:
            self.stop_writer()
            self._reap()
            if not final:
                logger.error(
                    "django-clustershm: the Manager's loop died: no snapshot written at stop; %s stays as it was",
                    self.config.path,
                )
                return
            started = time.monotonic()
            entries, size = write(self.engine, self.config.path)
            logger.info(
                "django-clustershm: snapshot of %d entries (%d bytes) written to %s in %.2fs",
                entries,
                size,
                self.config.path,
                time.monotonic() - started,
            )
        except Exception as exc:
            self._failed(f"the snapshot at stop could not be written to {self.config.path}: {exc}")
        finally:
            self.writing_final = False

    def forget_in_child(self) -> None:
        """In a forked worker: close its copy of the writer's pipe."""
        if self.child is not None:
            with contextlib.suppress(OSError):
                os.close(self.child.report)
            self.child = None
        self._zombies = []

    def stats(self) -> dict:
        return {
            "path": self.config.path,
            "interval": self.config.interval,
            "writing": self.child is not None,
            "written": self.written,
            "failed": self.failed,
            "last": self.last,
            "last_error": self.last_error,
            "max_fork_ms": round(self.max_fork_ms, 3),
        }
