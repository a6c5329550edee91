"""The Manager: a Unix-socket server around the :class:`~.engine.Engine`.

::

    from django_clustershm.server import Manager

    with Manager() as manager:          # a fresh private directory for the socket
        manager.start()                 # serve in a thread of this process
        client = django_clustershm.connect(manager.address, manager.secret)


One selector loop owns every connection and is the only code that touches
the engine, so operations need no locks and each is atomic with respect to
all others. The loop runs in a thread of the process that starts it (the
cluster master under ``runcluster``), or in the foreground with
:meth:`Manager.serve_forever`.

Why a thread of the master rather than the arbiter's own idle wait: the
Manager must answer while the arbiter is busy in its own sleeps (a graceful
stop waits up to ``graceful_timeout`` for workers that may still be calling
the Manager to finish their requests). A thread is safe to fork from here
because a forked worker never touches the Manager's objects: the at-fork
reset (:func:`forget_in_child`, the first step of the package's one ordered
after-fork reset in :mod:`django_clustershm.registry`) only closes the
child's copies of the Manager's descriptors, and CPython re-initialises the
locks (logging, the GIL) that a child could need.
``tests/test_manager.py`` forks children while the loop is under load.

Security: the socket lives in a fresh directory of mode 0700 and is itself
0600; every peer's uid is checked with ``SO_PEERCRED``; and the peer must
prove it holds the cluster secret with an HMAC over a random challenge (see
:mod:`..wire.handshake`). A peer gets :data:`..wire.frames.HANDSHAKE_MAX_FRAME` bytes
and :attr:`Manager.handshake_timeout` seconds to do so.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from ..exceptions import (
    ArgumentTypeError,
    AuthenticationFailed,
    ClusterShmError,
    LimitExceeded,
    ProtocolError,
    ValueTooLarge,
)
from ..wire import frames as P
from ..wire import handshake as H
from ..wire.limits import Limits
from . import gcpolicy
from .engine import DEFERRED, NO_REPLY, Engine, Session
from .snapshot import Periodic, SnapshotConfig
from .stamps import Stamps

logger = logging.getLogger("django_clustershm.manager")

#: The Managers of this process, for the after-fork reset.
_instances: weakref.WeakSet[Manager] = weakref.WeakSet()


def forget_in_child() -> None:
    """In a forked child: close the child's copies of every Manager's
    descriptors (never unlink, never shut down: the parent still serves), and
    give the child's garbage collector back its settings if a Manager owned
    them here (see :mod:`.gcpolicy`)."""
    gcpolicy.after_fork_in_child()
    for manager in list(_instances):
        manager._forget_in_child()


_IOV_BATCH = 64  # buffers one sendmsg() takes at most (Linux allows 1,024)
STAMPS_SUFFIX = P.STAMPS_SUFFIX
_RECV_SIZE = 64 * 1024  # under glibc's mmap threshold: a larger recv() buffer costs an mmap+munmap per call
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR  # a recv() tells which
#: Seconds the loop may go without checking timers (lock waits, leases,
#: expiry events) while requests keep it busy.
_TICK = 0.001


def _remove_files(address: str, own_dir: str | None, pid: int) -> None:
    if os.getpid() != pid:
        return
    for path in (address, address + STAMPS_SUFFIX):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)


def _raise_fd_limit() -> None:
    """Every worker thread holds a connection: raise the soft limit on open
    files to the hard one (as nginx's worker_rlimit_nofile or Redis's maxclients do)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # not allowed here: keep the limit we have
        pass


def _bind(listener: socket.socket, address: str) -> None:
    """Bind ``address`` (born 0600). A socket file already there is taken over
    only if nothing answers on it (a Manager that died without cleaning up);
    a live one makes this fail, and is left alone."""
    old_umask = os.umask(0o177)  # the socket is born 0600, no window at 0755
    try:
        try:
            listener.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens there any more
        except OSError:
            raise OSError(
                errno.EADDRINUSE, f"cannot tell whether a server listens on {address}; not taking it over"
            ) from None
        else:
            raise OSError(errno.EADDRINUSE, f"a Manager (or another server) is already listening on {address}")
        finally:
            probe.close()
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        listener.bind(address)
    finally:
        os.umask(old_umask)


class _Conn:
    __slots__ = (
        "closed",
        "closing",
        "cut_reason",
        "deadline",
        "fd",
        "gone",
        "listener",
        "mask",
        "nonce",
        "out",
        "out_size",
        "overflow",
        "peer_pid",
        "peer_uid",
        "pending",
        "reader",
        "session",
        "sock",
    )

    def __init__(self, sock: socket.socket, deadline: float, budget: P.BigBudget | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = P.FrameReader(P.HANDSHAKE_MAX_FRAME, budget)
        self.out: list[bytes | memoryview] = []
        self.out_size = 0
        self.session: Session | None = None
        self.nonce = os.urandom(H.NONCE_SIZE)
        self.deadline = deadline
        self.peer_pid = 0
        self.peer_uid = -1
        self.mask = _READ
        self.overflow = False
        self.gone = False  # the peer closed its end (seen when writing to it)
        self.closed = False
        # Frames read but not yet answered (the output was over its bound).
        self.pending: list | None = None
        # Why it closes once its output is sent (its stream broke after that output).
        self.closing: str | None = None
        # A listener channel (it was pushed events), and why it was cut off if it was.
        self.listener = False
        self.cut_reason: str | None = None


class Manager:
    """Serve an :class:`Engine` over a Unix socket.

    ``address``: the socket path; by default a fresh private directory is
    made for it (and removed on :meth:`close`), with the secret beside the
    socket in a 0600 file named ``secret`` so that other processes of the same
    user on this host can attach (``django_clustershm.connect(address)``).

    ``own_gc``: True in a process that exists to serve this Manager (the
    master ``runcluster`` runs, or a script that only serves it): when it
    starts serving, the Manager takes over the process's garbage collector
    (frozen start-up objects, a higher young threshold, timed collections:
    see :mod:`.gcpolicy`). Never in a process that runs other code, which
    keeps its own settings (the default).
    """

    #: Seconds a new connection has to complete the handshake.
    handshake_timeout = 10.0
    #: Reply bytes queued for one client beyond which we stop reading its requests.
    max_pending_output = 128 * 1024 * 1024
    #: Unsent bytes queued for all clients together (replies and listener
    #: events) beyond which the Manager sheds load: it reads no more requests
    #: from a client that has unsent output (one with none is still served),
    #: and cuts off a listener holding more than its share. Per-connection bounds alone let N slow
    #: peers multiply them (30 listeners that never read: +631 MB at once).
    #: 256 MiB: twice max_pending_output, so one client can still use its own
    #: bound in full; four times the largest frame, so a maximal reply fits;
    #: and a small part of a server's memory, like Redis's client buffers.
    max_total_output = 256 * 1024 * 1024
    #: Listener events queued for one client beyond which it is cut off (it
    #: reconnects and subscribes again): a slow listener can neither grow the
    #: Manager's memory nor slow the writers down.
    max_listener_backlog = 16 * 1024 * 1024
    #: Seconds the loop keeps polling after activity before it sleeps (0: never spin).
    spin = 50e-6
    #: Connections that have not completed the handshake, at most (the oldest makes room).
    max_unauthenticated = 64
    #: Warnings about clients logged per second at most (the rest are counted).
    max_warnings_per_second = 20
    #: Seconds a connection whose stream broke has to read its last replies.
    closing_timeout = 5.0
    #: Connections beyond this are refused (closed at once, with a log line).
    max_connections = 4096

    def __init__(
        self,
        address: str | None = None,
        secret: bytes | None = None,
        *,
        engine: Engine | None = None,
        limits: Limits | None = None,
        max_store_bytes: int | None = None,
        write_secret_file: bool = True,
        max_connections: int | None = None,
        max_listener_backlog: int | None = None,
        max_pending_output: int | None = None,
        max_total_output: int | None = None,
        max_unauthenticated: int | None = None,
        snapshot: SnapshotConfig | None = None,
        own_gc: bool = False,
    ) -> None:
        self.own_gc = own_gc
        if max_unauthenticated is not None:
            self.max_unauthenticated = max_unauthenticated
        if max_pending_output is not None:
            self.max_pending_output = max_pending_output
        if max_connections is not None:
            self.max_connections = max_connections
        if max_listener_backlog is not None:
            self.max_listener_backlog = max_listener_backlog
        if max_total_output is not None:
            self.max_total_output = max_total_output
        self.engine = engine or Engine(limits=limits, max_store_bytes=max_store_bytes)
        self.engine.loop_stats = self.loop_stats
        #: Snapshots (see .snapshot): periodic ones from the loop, the last one when it stops.
        self.snapshots = Periodic(self.engine, snapshot) if snapshot is not None else None
        if self.snapshots is not None:
            self.engine.snapshot_stats = self.snapshots.stats
        self.secret = secret if secret is not None else os.urandom(32)
        self._own_dir = None
        if address is None:
            self._own_dir = tempfile.mkdtemp(prefix="clustershm-")  # mode 0700
            address = os.path.join(self._own_dir, "manager.sock")
        self.address = address
        self.secret_file = None
        self._pid = os.getpid()
        self._uid = os.getuid()
        self._conns: dict[int, _Conn] = {}
        # Unsent bytes of every connection together (the sum of their out_size,
        # kept where out_size changes), and how many listener channels there are.
        self._output = 0
        self._listeners = 0
        # Big requests being received into buffers of their size: what those
        # hold before their bytes come, for all connections together, is
        # bounded (past it, chunks as for small frames; see wire.frames.BigBudget).
        self._inbound = P.BigBudget(self.max_total_output)
        # Connections that have not completed the handshake, oldest first.
        self._unauthenticated: dict[int, _Conn] = {}
        self._calls: deque = deque()
        # Connections given a reply outside their own request (a lock grant
        # caused by another client's release): flushed at the end of the
        # loop iteration, never from inside the engine's own bookkeeping.
        self._dirty: set[_Conn] = set()
        self._stopping = False
        self._accept_paused = False
        self._warn_window = 0.0
        self._warn_count = self._warn_suppressed = 0
        #: Seconds of the loop's longest round since it started (see loop_stats).
        self.max_stall = 0.0
        self._stall_recent = self._stall_last_minute = 0.0
        self._stall_seconds = 0
        #: on_failure(exc): called (from the loop's thread) if the loop dies.
        self.on_failure: Callable[[BaseException], None] | None = None
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._serving: threading.Thread | None = None
        self._closed = False

        _raise_fd_limit()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _bind(listener, address)
            listener.listen(512)
            listener.setblocking(False)
        except OSError:
            listener.close()
            # Only what this Manager made: a failed bind must never unlink the
            # socket of a live Manager at the same address.
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
            raise
        self._listener = listener
        self._open_stamps()
        if write_secret_file and self._own_dir is not None:
            self.secret_file = os.path.join(self._own_dir, "secret")
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.secret)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # epoll itself rather than the selectors module: a poll that finds
        # nothing is most of what the spinning loop does, and the wrapper
        # doubled its cost (see _loop).
        self._ep = select.epoll()
        self._ep.register(listener.fileno(), _READ)
        self._ep.register(self._wake_r.fileno(), _READ)
        # Files are removed even if the Manager is never closed (at exit, or
        # when collected), but only by the process that made them.
        self._finalizer = weakref.finalize(self, _remove_files, address, self._own_dir, self._pid)
        _instances.add(self)
        logger.debug("Manager listening on %s", address)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Manager:
        """Serve in a daemon thread of this process; return self."""
        if self._thread is not None:
            raise RuntimeError("the Manager is already running")
        if self.own_gc:
            gcpolicy.adopt()  # here, not in the thread: never while this thread may fork
        self._thread = threading.Thread(target=self.serve_forever, name="clustershm-manager", daemon=True)
        self._serving = self._thread
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`close`.

        If the loop dies of anything (a MemoryError, a bug of ours), that is
        logged as critical and :attr:`on_failure` is called with the error
        before it is raised: a server must not limp on without its Manager
        (the cluster's hook stops the master with a non-zero exit)."""
        self._serving = threading.current_thread()
        if self.own_gc:
            gcpolicy.adopt()  # the state is restored and the server set up: what exists now is frozen (once)
        try:
            self._loop()
        except BaseException as exc:
            if not self._stopping:
                logger.critical("the Manager's loop died: %r; the Manager is gone", exc, exc_info=True)
                self.failure = exc
                if self.on_failure is not None:
                    self.on_failure(exc)
            raise
        finally:
            self._shutdown()
            self._serving = None

    def request_stop(self) -> None:
        """Ask the loop to stop after its current round (safe from a signal
        handler and from any thread); :meth:`close` also waits for it."""
        self._stopping = True
        self._wake()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection, remove the socket and its directory.

        Safe from any thread, and from a signal handler of the serving thread
        (then the loop finishes its iteration and shuts down by itself).
        """
        if self._closed or os.getpid() != self._pid:
            return
        self._stopping = True
        self._wake()
        serving = self._serving
        if serving is None:
            self._shutdown()
        elif serving is not threading.current_thread():
            serving.join(timeout)
            while serving.is_alive() and self.snapshots is not None and self.snapshots.writing_final:
                serving.join(0.1)  # the last snapshot takes what it takes (seconds at millions of keys)
            if serving.is_alive():
                logger.error("the Manager thread did not stop within %.1fs", timeout)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the Manager's loop (safe from any thread)."""
        self._calls.append((fn, args))
        self._wake()

    def request_snapshot(self) -> None:
        """Have the loop fork a snapshot writer now, as an INTERVAL would (safe
        from any thread); nothing if snapshots are off or one is being written."""
        if self.snapshots is not None:
            self.call_soon(self.snapshots.start)

    def forget_pid(self, pid: int) -> None:
        """Drop every connection of process ``pid`` (gunicorn's ``child_exit``).

        A dead worker's sockets close by themselves and the Manager sees EOF;
        this is the backstop for a descriptor that outlived the worker (a
        grandchild that inherited it), so that what the worker held is
        released at once whatever became of its descriptors.
        """
        self.call_soon(self._forget_pid, pid)

    def _forget_pid(self, pid: int) -> None:
        for conn in [c for c in self._conns.values() if c.peer_pid == pid]:
            self._close(conn, None)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn, None)
        self._ep.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._remove_files()
        if self.snapshots is not None:
            # Every connection is closed: nothing changes any more. Not after
            # the loop died of something: the last periodic snapshot stays.
            self.snapshots.close(final=self.failure is None)
        logger.debug("Manager on %s stopped", self.address)

    def _remove_files(self) -> None:
        if os.getpid() == self._pid:
            self._close_stamps(dead=True)  # its processes' copies stop answering
        _remove_files(self.address, self._own_dir, self._pid)

    def _open_stamps(self) -> None:
        """The near caches' stamps file, beside the socket (see .stamps).
        Without it (no room, a file system that refuses), near caches keep no
        copies: every read goes to the Manager."""
        path = self.address + STAMPS_SUFFIX
        try:
            self.engine.stamps = Stamps(path, clock=self.engine.clock)
        except OSError as exc:
            logger.warning("near caches keep no copies: cannot make %s (%s)", path, exc)

    def _close_stamps(self, dead: bool) -> None:
        stamps, self.engine.stamps = self.engine.stamps, None
        if stamps is not None:
            stamps.close(dead=dead)

    def _forget_in_child(self) -> None:
        # A forked child (a worker) gets copies of our descriptors. Close them
        # so that the child holds no socket of the Manager's: a worker that
        # kept a client connection's fd open would keep that client alive in
        # the Manager's eyes after the client's own process died. Never unlink
        # or shut down here: the parent still serves on them.
        if self._closed:
            return
        self._closed = True
        self._thread = self._serving = None
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns = {}
        self._unauthenticated = {}
        self._close_stamps(dead=False)  # the child writes no stamp (its own clients map the file read-only)
        if self.snapshots is not None:
            self.snapshots.forget_in_child()
        for obj in (self._listener, self._wake_r, self._wake_w, self._ep):
            try:
                obj.close()
            except OSError:
                pass

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        poll = self._ep.poll
        conns = self._conns
        engine = self.engine
        listener_fd = self._listener.fileno()
        wake_fd = self._wake_r.fileno()
        clock = time.monotonic
        spin = self.spin
        spin_skip = spin_backoff = 0
        snapshots = self.snapshots
        next_check = clock() + 1.0
        next_tick = 0.0
        while not self._stopping:
            events = poll(0)
            if not events:
                if spin and spin_skip:
                    spin_skip -= 1
                elif spin:
                    # Poll a little before sleeping: a worker that just got its
                    # reply usually sends its next request within microseconds,
                    # and waking a sleeping CPU costs more than that (on a 2-vCPU
                    # VM, 20-40 us a wake-up). Measured with bench/bench_core.py:
                    # get latency 51 -> 31 us, 4-process ops/s 78k -> 85k. The
                    # cost is at most `spin` seconds of CPU after each burst, and
                    # polling that finds nothing backs off (below).
                    spin_until = clock() + spin
                    while not events and clock() < spin_until:
                        events = poll(0)
                    if events:
                        spin_backoff = 0
                    else:
                        # Nothing came while polling: the clients are slow (a busy
                        # machine, where polling takes CPU they need). Poll again
                        # only after 1, 3, 7... 256 idle rounds.
                        spin_backoff = min(spin_backoff * 2 + 1, 256)
                        spin_skip = spin_backoff
                if not events:
                    # About to sleep: run the timers, and sleep until the next is due.
                    deadline = engine.tick()
                    if self._dirty:
                        self._flush_dirty()
                    now = clock()
                    next_tick = now + _TICK
                    timeout = min(next_check, deadline) - now if deadline is not None else next_check - now
                    events = poll(max(timeout, 0.0))
            round_start = clock()
            accept = False
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is not None:
                    # Accepting waits for the end of the round, so an fd freed
                    # by a connection closed in this round is not reused until
                    # its stale events are past.
                    if mask & _READABLE:
                        self._on_readable(conn)
                    if mask & _WRITE and not conn.closed:
                        self._flush(conn)
                        if conn.pending and not conn.closed and not self._held_back(conn):
                            self._serve_frames(conn, conn.pending)
                elif fd == listener_fd:
                    accept = True
                elif fd == wake_fd:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    calls = self._calls
                    while calls:
                        fn, args = calls.popleft()
                        try:
                            fn(*args)
                        except Exception:
                            logger.exception("error in a call scheduled on the Manager")
            if accept:
                self._accept()
            if self._dirty:
                self._flush_dirty()
            if self._output > 2 * self.max_total_output:
                self._shed_output()
            now = clock()
            if now >= next_tick:
                # Busy: timers are run at least every _TICK seconds (each
                # request's own lazy checks see expiry at once in any case).
                engine.tick()
                next_tick = now + _TICK
                if self._dirty:
                    self._flush_dirty()
            if now >= next_check:
                next_check = now + 1.0
                self._drop_slow_handshakes(now)
                self._resume_accepting()
                self._stall_window()
                self._warn_tick(now)
                if snapshots is not None:
                    snapshots.tick(now)  # may fork a writer: between rounds, all requests answered
            stall = clock() - round_start
            if snapshots is not None and snapshots.child is not None:
                snapshots.note_round(stall)
            if stall > self._stall_recent:
                self._stall_recent = stall
                if stall > self.max_stall:
                    self.max_stall = stall

    def _stall_window(self) -> None:
        """Every second: the longest round of the last minute rolls over."""
        self._stall_seconds += 1
        if self._stall_seconds >= 60:
            self._stall_seconds = 0
            self._stall_last_minute = self._stall_recent
            self._stall_recent = 0.0

    def loop_stats(self) -> dict:
        """The loop's longest round (the longest any one event kept every
        client waiting): ever, and over the last minute or so; and the unsent
        output of all clients together, with its budget."""
        return {
            "max_stall_ms": round(self.max_stall * 1000, 3),
            "recent_max_stall_ms": round(max(self._stall_recent, self._stall_last_minute) * 1000, 3),
            "connections": len(self._conns),
            "output_bytes": self._output,
            "max_total_output": self.max_total_output,
        }

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                raise
            if len(self._conns) >= self.max_connections:
                logger.error("refusing a client: %d connections already open", len(self._conns))
                try:  # told why, in its own words (not "authentication failed")
                    sock.send(
                        P.encode(
                            P.ERR,
                            0,
                            [LimitExceeded.code, f"the Manager has {len(self._conns)} connections, its maximum"],
                        )
                    )
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.handshake_timeout, self._inbound)
            try:
                pid, uid, _gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
            except OSError as exc:
                logger.warning("refusing a client whose credentials cannot be read: %s", exc)
                sock.close()
                continue
            conn.peer_pid, conn.peer_uid = pid, uid
            if len(self._unauthenticated) >= self.max_unauthenticated:
                # Half-open peers have their own small cap, and the oldest makes
                # room: a legitimate client authenticates in microseconds, so a
                # flood of silent peers cannot keep it out (4,096 of them used to
                # block new clients for 10 s at a time).
                oldest = next(iter(self._unauthenticated.values()))
                self._close(oldest, "no handshake yet; dropped to make room for a new peer")
            self._conns[conn.fd] = conn
            self._unauthenticated[conn.fd] = conn
            self._ep.register(conn.fd, _READ)
            conn.out.append(H.hello(conn.nonce, self._pid))
            conn.out_size = len(conn.out[0])
            self._output += conn.out_size
            self._flush(conn)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: the listening socket stays readable, and accepting
        again at once would spin the loop (3 CPU-s in 3 s, 13 MB of log). Stop
        watching it until the next periodic check (at most a second)."""
        if not self._accept_paused:
            self._accept_paused = True
            self._ep.unregister(self._listener.fileno())
            logger.error("cannot accept clients (%s); not accepting for a second", exc)

    def _resume_accepting(self) -> None:
        if self._accept_paused:
            self._accept_paused = False
            self._ep.register(self._listener.fileno(), _READ)

    def _drop_slow_handshakes(self, now: float) -> None:
        for conn in [c for c in self._unauthenticated.values() if c.deadline <= now]:
            self._close(conn, f"no handshake within {self.handshake_timeout:.0f}s")
        for conn in [c for c in self._conns.values() if c.closing is not None and c.deadline <= now]:
            self._close(conn, f"{conn.closing} (its last replies were not read within {self.closing_timeout:.0f}s)")

    def _close(self, conn: _Conn, reason: str | None) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if self._unauthenticated.get(conn.fd) is conn:
            del self._unauthenticated[conn.fd]
        self._drop_output(conn)
        conn.reader.discard()
        if conn.listener:
            self._listeners -= 1
        if reason:
            self._warn("closing client (pid %s): %s", conn.peer_pid, reason)
        try:
            self._ep.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()
        if conn.session is not None:
            self.engine.close_session(conn.session)
            conn.session = None

    def _on_readable(self, conn: _Conn) -> None:
        if conn.closing is not None:  # not read from any more: this is a hang-up or an error
            self._close(conn, conn.closing)
            return
        try:
            if conn.reader.big is not None:  # the rest of a big request: straight into its buffer, never joined
                count = conn.sock.recv_into(conn.reader.room())
                data = b"" if not count else None
            else:
                data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            # A peer that closed with our data unread in its socket (a near-cache
            # tracker, typically): a normal departure, not a fault.
            self._close(conn, None)
            return
        except OSError as exc:
            self._close(conn, f"receive failed: {exc}")
            return
        if data is None:
            frames = conn.reader.filled(count)
        elif not data:
            if conn.reader.pending():
                self._close(conn, f"connection ended inside a frame ({conn.reader.pending()} bytes pending)")
            else:
                self._close(conn, None)
            return
        else:
            try:
                frames = conn.reader.feed(data)
            except ProtocolError as exc:
                self._close(conn, str(exc))
                return
        if not frames:
            return
        if conn.session is None:
            self._handshake(conn, frames)
            return
        if conn.pending:  # frames still unanswered come first (not read meanwhile, as a rule)
            frames = conn.pending + frames
        self._serve_frames(conn, frames)

    def _held_back(self, conn: _Conn) -> bool:
        """Whether ``conn`` is not served more requests for now: it has unsent
        output, and that is over its own bound or all clients' together are
        over the Manager's budget. A client whose output is empty is always
        served: one that reads its replies never waits for the others."""
        return conn.out_size > 0 and (conn.out_size > self.max_pending_output or self._output > self.max_total_output)

    def _serve_frames(self, conn: _Conn, frames: list) -> None:
        """Answer ``frames`` in order; stop *before* a frame while this
        connection is held back (see :meth:`_held_back`), keeping the rest for
        when it drains (and reading nothing more meanwhile): pipelined reads
        of a large value cannot make the Manager buffer more than the bounds,
        whatever the number of clients that send them."""
        session = conn.session
        if session is None:  # closed meanwhile
            return
        engine = self.engine
        encode = P.encode
        encode_parts = P.encode_parts
        parts_size = P.parts_size
        big = P.BIG
        big_map = P.BigMap
        big_list = P.BigList
        max_frame = self.engine.limits.max_frame
        max_output = self.max_pending_output
        budget = self.max_total_output
        out = conn.out
        for index, (op, rid, payload) in enumerate(frames):
            if conn.out_size and (conn.out_size > max_output or self._output > budget):
                # Send what it has first (events before replies, as below): a
                # client that reads its replies is served on, a reply at a time.
                if self._dirty:
                    self._flush_dirty()
                if not conn.closed:
                    self._flush(conn)
                if conn.closed:
                    return
                if self._held_back(conn):
                    conn.pending = frames[index:]
                    break
            try:
                args = P.decode_payload(payload)
            except ProtocolError as exc:  # not msgpack: the stream cannot be trusted
                self._close_after_replies(conn, str(exc))
                return
            try:
                if type(args) is not list:
                    raise ArgumentTypeError("a request's payload is a list of arguments")
                result = engine.dispatch(session, op, args, rid)
                if result is DEFERRED:
                    queued = encode(P.PUSH_QUEUED, rid, None)
                    out.append(queued)
                    conn.out_size += len(queued)
                    self._output += len(queued)
                    continue
                if result is NO_REPLY:
                    continue
                kind = type(result)
                if (kind is bytes and len(result) >= big) or kind is big_list or kind is big_map:
                    # A big value goes out as a buffer of its own: the store's bytes, never copied
                    # (in the reply of a TRACK_GET or a GET_MANY too, marked as such: see encode_parts).
                    parts = encode_parts(P.OK, rid, result)
                    size = parts_size(parts)
                else:
                    parts = None
                    reply = encode(P.OK, rid, result)
                    size = len(reply)
                if size - P.HEADER_SIZE > max_frame:
                    raise ValueTooLarge(
                        f"the reply would be {size} bytes, over the maximum frame of {max_frame}; ask for fewer keys"
                    )
                if parts is None:
                    out.append(reply)
                else:
                    out.extend(parts)
                conn.out_size += size
                self._output += size
                continue
            except ClusterShmError as exc:
                # A refused request (a bad argument, an unknown opcode): an
                # error reply, and the connection (with its locks) stays.
                reply = encode(P.ERR, rid, [exc.code, str(exc)])
            out.append(reply)
            conn.out_size += len(reply)
            self._output += len(reply)
        else:
            conn.pending = None
        if conn.reader.error is not None and conn.pending is None:
            # A malformed frame after these: they were applied, so they are
            # answered; nothing after it is read.
            self._close_after_replies(conn, str(conn.reader.error))
            return
        if self._dirty:
            # Listener events caused by these requests go out before the
            # writer's reply does: a listener hears of a write before the
            # writer's call returns.
            self._flush_dirty()
        if not conn.closed:
            self._flush(conn)

    def _close_after_replies(self, conn: _Conn, reason: str) -> None:
        """Close a connection whose stream broke, once the replies of the requests
        before the break have gone out: nothing more is read from it, its output
        drains on the loop like any other (never a blocking send: the peer may be
        hostile), and it is closed when empty, or after ``closing_timeout``."""
        if self._dirty:
            self._flush_dirty()
        if conn.closed:
            return
        conn.pending = None
        conn.closing = reason
        conn.deadline = time.monotonic() + self.closing_timeout
        self._flush(conn)

    def _handshake(self, conn: _Conn, frames) -> None:
        op, _rid, payload = frames[0]
        if len(frames) > 1:
            self._close(conn, "handshake failed: expected one AUTH frame")
            return
        if conn.peer_uid != self._uid:
            self._refuse(conn, f"peer uid {conn.peer_uid} is not the Manager's uid {self._uid}")
            return
        try:
            client_nonce, client_pid = H.check_auth(op, payload, self.secret, conn.nonce)
        except AuthenticationFailed as exc:
            self._refuse(conn, str(exc))
            return
        except ProtocolError as exc:
            self._close(conn, f"handshake failed: {exc}")
            return
        self._unauthenticated.pop(conn.fd, None)
        session = conn.session = self.engine.open_session(pid=conn.peer_pid or client_pid, peer_uid=conn.peer_uid)
        session.deliver = lambda rid, result, conn=conn: self._deliver(conn, rid, result)
        session.push = lambda event, conn=conn: self._push(conn, event)
        conn.reader.max_frame = self.engine.limits.max_frame
        reply = H.welcome(self.secret, client_nonce, self.engine.limits, session.id)
        conn.out.append(reply)
        conn.out_size += len(reply)
        self._output += len(reply)
        self._flush(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if not conn.closed:
                if conn.gone:
                    self._close(conn, None)
                elif conn.overflow:
                    self._close(conn, conn.cut_reason or "cut off")
                else:
                    self._flush(conn)

    def _push(self, conn: _Conn, event: tuple) -> None:
        """Queue a listener event. A listener past its own bound is cut off,
        and so is one past its share of the Manager's budget while all
        clients' output is over it: N slow listeners hold about the budget
        between them, not N times their own bound."""
        if conn.overflow:
            return
        parts = P.encode_parts(P.PUSH_EVENT, 0, event)  # a big value, not copied
        size = P.parts_size(parts)
        conn.out.extend(parts)
        conn.out_size += size
        self._output += size
        if not conn.listener:
            conn.listener = True
            self._listeners += 1
        if conn.out_size > self.max_listener_backlog:
            self._cut(conn, f"listener too slow: {conn.out_size} bytes of events pending; cut off")
        elif self._output > self.max_total_output and conn.out_size > self.max_total_output // self._listeners:
            self._cut(
                conn,
                f"listener too slow: {conn.out_size} bytes of events pending, over its share "
                f"({self.max_total_output // self._listeners}) of the output budget of all clients "
                f"({self.max_total_output}); cut off",
            )
        self._dirty.add(conn)

    def _shed_output(self) -> None:
        """The hard ceiling, twice ``max_total_output``: close the held-back
        clients with the largest unsent output until the total is back under
        the budget.

        Held back, a client that never reads still gets one reply once its
        output is empty, so N such clients could hold N of the largest replies
        between them; past the ceiling the largest go (as Redis's
        client-output-buffer-limit closes a client). A scan of the
        connections, only when over the ceiling."""
        # Only those held back with requests still waiting (pipelining without
        # reading): a client in the middle of reading one large reply is not one.
        held = (c for c in self._conns.values() if c.out_size and c.pending)
        by_size = sorted(held, key=lambda c: c.out_size, reverse=True)
        for conn in by_size:
            if self._output <= self.max_total_output:
                break
            self._close(
                conn,
                f"it does not read: {conn.out_size} bytes unsent, with all clients' output over twice "
                f"the budget (max_total_output={self.max_total_output})",
            )

    def _cut(self, conn: _Conn, reason: str) -> None:
        """Cut a listener off: its backlog is dropped now (it is closed, with
        ``reason``, at the end of this round)."""
        conn.overflow = True
        conn.cut_reason = reason
        self._drop_output(conn)

    def _drop_output(self, conn: _Conn) -> None:
        if conn.out_size:
            self._output -= conn.out_size
            conn.out_size = 0
            conn.out.clear()

    def _deliver(self, conn: _Conn, rid: int, result) -> None:
        if conn.closed:
            return
        reply = P.encode(P.OK, rid, result)
        conn.out.append(reply)
        conn.out_size += len(reply)
        self._output += len(reply)
        self._dirty.add(conn)

    def _warn(self, message: str, *args) -> None:
        """A warning about a peer, rate-limited: a flood of bad peers cannot
        flood the log (60k bad frames wrote 5.35 MB); what is held back is
        counted and said once per second."""
        now = time.monotonic()
        if now >= self._warn_window:
            self._warn_tick(now)
            self._warn_window = now + 1.0
        if self._warn_count < self.max_warnings_per_second:
            self._warn_count += 1
            logger.warning(message, *args)
        else:
            self._warn_suppressed += 1

    def _warn_tick(self, now: float) -> None:
        """Once the second is over (also from the loop's periodic check): say what was held back."""
        if now >= self._warn_window:
            if self._warn_suppressed:
                logger.warning(
                    "%d more warnings about clients were not logged in the last second", self._warn_suppressed
                )
            self._warn_count = self._warn_suppressed = 0

    def _refuse(self, conn: _Conn, reason: str) -> None:
        self._warn("refusing client (pid %s): %s", conn.peer_pid, reason)
        try:
            conn.sock.send(H.refusal())
        except OSError:
            pass
        self._close(conn, None)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        if out:
            # Scatter-gather, and what is left is sliced as a view: a backlog
            # is never copied (joining and re-slicing it copied it twice per
            # partial send).
            try:
                sent = conn.sock.send(out[0]) if len(out) == 1 else conn.sock.sendmsg(out[:_IOV_BATCH])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._close(conn, None if exc.errno in (errno.EPIPE, errno.ECONNRESET) else f"send failed: {exc}")
                return
            if sent == conn.out_size:  # the common case: everything went
                out.clear()
                conn.out_size = 0
                self._output -= sent
            elif sent:
                conn.out_size -= sent
                self._output -= sent
                done = 0
                while done < len(out) and sent >= len(out[done]):
                    sent -= len(out[done])
                    done += 1
                if done:
                    del out[:done]
                if sent:
                    out[0] = memoryview(out[0])[sent:]
        if conn.closing is not None and not conn.out:
            self._close(conn, conn.closing)
            return
        if conn.out:
            # A client that does not read its replies is not served more
            # requests until it does (and frames it sent meanwhile wait,
            # unanswered): its backlog cannot grow without bound, nor can
            # those of all clients together grow past the Manager's budget.
            if conn.pending or conn.closing is not None or self._held_back(conn):
                mask = _WRITE
            else:
                mask = _READ | _WRITE
        elif conn.pending:
            # Drained with frames still unanswered: served on the next round
            # (as writable), not left waiting for a request that may never come.
            mask = _WRITE
        else:
            mask = _READ
        if mask != conn.mask:
            conn.mask = mask
            self._ep.modify(conn.fd, mask)
