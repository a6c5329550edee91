"""The asyncio client: the awaitable twin of :class:`~.client.Client`, for ASGI.

::

    client = django_clustershm.get_client().aio        # or Client(transport).aio
    await client.aset("greeting", "hello", timeout=60)
    await client.aget("greeting")
    async with django_clustershm.AsyncLock("order:42", timeout=5):
        ...

No thread per call. Over a socket, each event loop has **one** connection,
on which every task of that loop pipelines its requests: a request id
matches each reply to its awaiting future, so thousands of tasks can await
at once (a lock waiter included: a waiting acquire is a future, not a
thread). The socket is the loop's own (``add_reader``/``add_writer``, no
asyncio transport), so a connection left behind by a closed loop is closed
without a warning, and one inherited through ``fork()`` is closed in the
child without touching the parent's event loop. A call that times out only
gives up its own future: the connection, and the locks other tasks of the
loop hold through it, stay. A task cancelled while waiting for a lock takes
its wait back (``LOCK_CANCEL``); a grant that raced the cancellation is
released as soon as it arrives.

Embedded (no cluster), the engine is the sync client's own, under its mutex:
sync and async code of one process see the same data and the same locks.
Each event loop has a session of its own there too.

Everything done on the caller's side (key checks, limits, serialisation, the
near cache, the listener barrier) is the sync client's, reused: only the
waiting differs.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ArgumentTypeError,
    ClusterShmError,
    ManagerUnavailable,
    ProtocolError,
    error_from_code,
)
from ..server.engine import DEFERRED
from ..wire import args as A
from ..wire import frames as F
from ..wire import handshake as H
from ..wire.limits import Limits
from .socket import DEFAULT_SPIN, HANDSHAKE_ATTEMPTS, HandshakeLost, request_frame
from .transport import DEFAULT_TIMEOUT, USE_DEFAULT, beat, heartbeat

if TYPE_CHECKING:
    from .embedded import EmbeddedTransport

# The sync client and keyspace this module wraps are typed loosely: client.py
# imports this module (Client.aio), and the layout allows no import cycle.
Client = Any
Keyspace = Any

#: Under glibc's mmap threshold, as the sync client's: a larger recv() buffer
#: cost an mmap, mremap and munmap per reply (bench_async: aget 59 -> 38 us pinned).
_RECV_SIZE = 64 * 1024
_encode = F.encode
_decode = F.decode_payload


def _reply(op: int, payload) -> Any:
    result = _decode(payload) if type(payload) is bytes else F.decode_reply(payload)
    if op == F.OK:
        return result
    if op == F.ERR:
        raise error_from_code(result[0], result[1])
    raise ProtocolError(f"unexpected reply opcode 0x{op:02x}")


def _keep_beating(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    """Keep this process's heartbeat (:func:`.transport.set_heartbeat`) going
    while ``future`` (a lock wait) is pending: an async view served by a sync
    gunicorn worker waits here while the worker's main thread blocks."""
    registered = heartbeat()
    if registered is None:
        return
    callback, interval = registered

    def tick() -> None:
        if not future.done():
            beat(callback)
            loop.call_later(interval, tick)

    tick()


def _expire(future: asyncio.Future, message: str) -> None:
    if not future.done():
        future.set_exception(ManagerUnavailable(message))


# -- over a socket ----------------------------------------------------------------------


class AsyncConnection:
    """One authenticated connection, owned by one event loop, pipelined by request id."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        # Weak: the transport keys its connections by loop in a
        # WeakKeyDictionary, and a strong reference back would keep every
        # loop (and its connection) alive forever.
        self._loop = weakref.ref(loop)
        self.sock = sock
        self.pid = os.getpid()
        self.reader = F.FrameReader(F.HANDSHAKE_MAX_FRAME)
        self.limits = Limits()
        self.session_id = 0
        self.rid = 0
        #: rid -> the future of its reply
        self.pending: dict[int, asyncio.Future] = {}
        #: rid -> key of lock acquires whose task went away: a grant that comes is released
        self.abandoned: dict[int, str] = {}
        self.lost: ClusterShmError | None = None
        self._out: deque[memoryview] = deque()
        #: (deadline, rid) of calls with the default timeout, in the order
        #: sent (so in deadline order): one timer sweeps them all, instead of
        #: a call_later per call (8 us each, bench_async). Nothing here refers
        #: to the loop: the transport keys connections by loop, weakly.
        self._deadlines: deque[tuple[float, int]] = deque()
        self._sweep_armed = False
        #: Seconds a call polls for its reply before it awaits (0: never); see spin_for().
        self.spin = 0.0
        self.spin_skip = 0
        self.spin_backoff = 0
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._handshake: asyncio.Future | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:  # pragma: no cover - only a running loop's connection is used
            raise ManagerUnavailable("the event loop of this connection is gone")
        return loop

    @classmethod
    async def open(cls, address: str, secret: bytes, timeout: float) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = cls(loop, sock)
        try:
            async with asyncio.timeout(timeout) if hasattr(asyncio, "timeout") else _Deadline(timeout):
                try:
                    await loop.sock_connect(sock, address)
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    raise ManagerUnavailable(f"no Manager is listening on {address} ({exc.strerror})") from exc
                except OSError as exc:
                    raise ManagerUnavailable(f"cannot connect to the Manager on {address}: {exc}") from exc
                op, _rid, payload = await conn._handshake_frame()
                auth, client_nonce = H.answer_hello(op, payload, secret)
                try:
                    await loop.sock_sendall(sock, auth)
                except OSError as exc:  # dropped after its HELLO: see socket.Connection
                    raise HandshakeLost(f"the Manager closed the connection during the handshake: {exc}") from exc
                op, _rid, payload = await conn._handshake_frame()
                conn.limits, conn.session_id = H.check_welcome(op, payload, secret, client_nonce)
        except TimeoutError as exc:
            sock.close()
            raise ManagerUnavailable(f"the Manager did not complete the handshake within {timeout}s") from exc
        except BaseException:
            sock.close()
            raise
        conn.reader.max_frame = conn.limits.max_frame
        loop.add_reader(sock.fileno(), conn._on_readable)
        # When the loop goes (asyncio.run() ended), its connection goes with
        # it, closed quietly: no ResourceWarning, no call into a closed loop.
        weakref.finalize(loop, sock.close)
        return conn

    async def _handshake_frame(self):
        while True:
            try:
                data = await self.loop.sock_recv(self.sock, F.HANDSHAKE_MAX_FRAME)
            except OSError as exc:
                raise HandshakeLost(f"the Manager closed the connection during the handshake: {exc}") from exc
            if not data:
                raise HandshakeLost("the Manager closed the connection during the handshake")
            frames = self.reader.feed(data)
            if frames:
                return frames[0]

    # -- the loop's callbacks -------------------------------------------------------------

    def _on_readable(self) -> None:
        reader = self.reader
        try:
            if reader.big is not None:  # the rest of a big reply: straight into its buffer
                count = self.sock.recv_into(reader.room())
                data = b"" if not count else None
            else:
                data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(ManagerUnavailable(f"lost the connection to the Manager: {exc}"))
            return
        if data is None:
            frames = reader.filled(count)
        elif not data:
            self._lose(ManagerUnavailable("the Manager closed the connection"))
            return
        else:
            try:
                frames = reader.feed(data)
            except ClusterShmError as exc:
                self._lose(exc)
                return
        pending = self.pending
        for op, rid, payload in frames:
            if op >= F.PUSH_MIN:
                continue  # PUSH_QUEUED: a lock wait; this connection subscribes to nothing
            future = pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result((op, payload))
            elif rid in self.abandoned:
                self._settle_abandoned(rid, op, payload)

    def _settle_abandoned(self, rid: int, op: int, payload) -> None:
        self._release_grant(self.abandoned.pop(rid), op, payload)

    def _release_grant(self, key: str, op: int, payload) -> None:
        """The reply to an acquire whose task went away: a grant is released at once."""
        if op == F.OK:
            granted = _decode(payload)
            if granted:
                self.post(F.LOCK_RELEASE, [key, granted[0]])

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        out = self._out
        while out:
            try:
                sent = self.sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(ManagerUnavailable(f"cannot send to the Manager: {exc}"))
                return
            if sent < len(out[0]):
                out[0] = out[0][sent:]
                return
            out.popleft()
        self.loop.remove_writer(self.sock.fileno())

    def _lose(self, error: ClusterShmError) -> None:
        if self.lost is not None:
            return
        self.lost = error
        try:
            self.loop.remove_reader(self.sock.fileno())
            if self._out:
                self.loop.remove_writer(self.sock.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        self.sock.close()
        self._out.clear()
        self._deadlines.clear()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    # -- requests ---------------------------------------------------------------------------

    def _write(self, frame: bytes | list) -> None:
        """Send a frame (:func:`.socket.request_frame`: bytes, or a big one's buffers), or queue what
        the socket does not take."""
        parts: list = [frame] if isinstance(frame, bytes) else frame
        out = self._out
        if out:
            out.extend(map(memoryview, parts))
            return
        try:
            sent = self.sock.send(frame) if isinstance(frame, bytes) else self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lose(ManagerUnavailable(f"cannot send to the Manager: {exc}"))
            raise self.lost from exc  # type: ignore[misc]
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
            else:
                out.append(memoryview(part)[sent:])
                sent = 0
        if out:
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _frame(self, op: int, rid: int, args: list) -> bytes | list:
        return request_frame(op, rid, args, self.limits.max_frame)

    def send(self, op: int, args: list) -> tuple[int, asyncio.Future]:
        """Send a request; its request id and the future of its reply ``(op, payload)``."""
        if self.lost is not None:
            raise self.lost
        self.rid = rid = (self.rid + 1) & 0xFFFFFFFF or 1
        frame = self._frame(op, rid, args)
        future = self.loop.create_future()
        self.pending[rid] = future
        try:
            self._write(frame)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        return rid, future

    def spin_for(self, future: asyncio.Future) -> None:
        """Poll the socket briefly for ``future``'s reply before the caller awaits it.

        As the sync client does (client/socket.py, DEFAULT_SPIN): a reply that
        comes within microseconds is read here, and the await returns at once,
        instead of the loop sleeping in epoll and paying a wake-up (15-100 us
        on a small VM). Bounded (``spin`` seconds) and adaptive: a poll that
        finds nothing in time (a busy machine, or many tasks in flight) turns
        polling off for the next 1, 3, 7... 256 calls, so a loop with many
        tasks, or a slow Manager, is not held up by it."""
        if self.spin_skip:
            self.spin_skip -= 1
            return
        if self._out:
            return  # the request is not even sent yet
        poll = self._poll.poll
        clock = time.perf_counter
        until = clock() + self.spin
        while clock() < until:
            if poll(0):
                self._on_readable()
                if future.done():
                    self.spin_backoff = 0
                    return
                if self.lost is not None:
                    return
        self.spin_backoff = min(self.spin_backoff * 2 + 1, 256)
        self.spin_skip = self.spin_backoff

    def expire_after(self, rid: int, future: asyncio.Future, timeout: float) -> None:
        """Fail ``future`` if it has no reply within ``timeout`` seconds (the
        transport's default: calls expire in the order they were sent)."""
        deadlines = self._deadlines
        pending = self.pending
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()  # answered: most replies come in order
        loop = self.loop
        deadlines.append((loop.time() + timeout, rid))
        if not self._sweep_armed:
            self._sweep_armed = True
            loop.call_later(timeout, self._sweep, timeout)

    def _sweep(self, timeout: float) -> None:
        self._sweep_armed = False
        if self.lost is not None:
            return
        deadlines = self._deadlines
        pending = self.pending
        loop = self.loop
        now = loop.time()
        while deadlines and (deadlines[0][1] not in pending or deadlines[0][0] <= now):
            _deadline, rid = deadlines.popleft()
            future = pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(ManagerUnavailable(f"no reply from the Manager within {timeout}s"))
        if deadlines:
            self._sweep_armed = True
            loop.call_later(max(deadlines[0][0] - now, 0.0), self._sweep, timeout)

    def post(self, op: int, args: list) -> None:
        """A request whose reply is not awaited (a cancel, the release of an abandoned grant)."""
        if self.lost is not None:
            return
        self.rid = rid = (self.rid + 1) & 0xFFFFFFFF or 1
        try:
            self._write(self._frame(op, rid, args))
        except ClusterShmError:
            pass

    def abandon(self, rid: int, key: str, future: asyncio.Future) -> None:
        """The task waiting for acquire ``rid`` went away (cancelled, or timed out)."""
        self.pending.pop(rid, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release_grant(key, *future.result())  # answered, but its task was gone
            return
        if self.lost is None:
            self.abandoned[rid] = key
            self.post(F.LOCK_CANCEL, [key, rid])

    def close(self) -> None:
        """Close the socket; from another loop or a forked child, without touching the owner loop."""
        if self.lost is None:
            self.lost = ManagerUnavailable("the connection was closed")
            loop = self._loop()
            if self.pid == os.getpid() and loop is not None and not loop.is_closed():
                try:
                    loop.remove_reader(self.sock.fileno())
                    if self._out:
                        loop.remove_writer(self.sock.fileno())
                except (OSError, ValueError, RuntimeError):
                    pass
            self.sock.close()


class _Deadline:
    """``asyncio.timeout`` for Python 3.10 (cancels the task at the deadline)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> _Deadline:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._expired = True
            if task is not None:
                task.cancel()

        self._handle = loop.call_later(self.seconds, expire)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if exc_type is asyncio.CancelledError and self._expired:
            raise TimeoutError
        return False


class AsyncSocketTransport:
    """A Manager at ``address``: one connection per event loop, pipelined."""

    name = "socket"
    remote = True
    splices = True  # (see Transport.splices)

    def __init__(
        self, address: str, secret: bytes, *, timeout: float = DEFAULT_TIMEOUT, spin: float = DEFAULT_SPIN
    ) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.spin = spin
        self._pid = os.getpid()
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnection] = weakref.WeakKeyDictionary()
        self._connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future] = (
            weakref.WeakKeyDictionary()
        )
        self._mutex = threading.Lock()
        self._limits: Limits | None = None

    def __repr__(self) -> str:
        return f"<AsyncSocketTransport {self.address}>"

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            raise ManagerUnavailable("not connected yet: the limits are learnt at the first call")
        return self._limits

    async def connection(self) -> AsyncConnection:
        if os.getpid() != self._pid:
            self.after_fork()
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is not None and conn.lost is None:
            return conn
        waiting = self._connecting.get(loop)
        if waiting is not None:  # one connect per loop, however many tasks ask at once
            return await asyncio.shield(waiting)
        future = loop.create_future()
        self._connecting[loop] = future
        try:
            self._sweep_closed_loops()
            conn = await self._open()
            conn.spin = self.spin
        except BaseException as exc:
            del self._connecting[loop]
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else ManagerUnavailable("connect cancelled"))
                future.exception()  # retrieved: no "never retrieved" warning if nobody else waits
            raise
        del self._connecting[loop]
        self._limits = conn.limits
        with self._mutex:
            self._conns[loop] = conn
        future.set_result(conn)
        return conn

    async def _open(self) -> AsyncConnection:
        """A new connection; one whose handshake the Manager dropped is tried again (see socket.HandshakeLost)."""
        for attempt in range(HANDSHAKE_ATTEMPTS - 1):
            try:
                return await AsyncConnection.open(self.address, self.secret, self.timeout)
            except HandshakeLost:
                await asyncio.sleep(0.01 * (attempt + 1))
        return await AsyncConnection.open(self.address, self.secret, self.timeout)

    def _sweep_closed_loops(self) -> None:
        """Connections of loops that were closed (asyncio.run() ended): closed, silently."""
        with self._mutex:
            for loop, conn in list(self._conns.items()):
                if loop.is_closed():
                    conn.close()
                    del self._conns[loop]

    async def _send(self, op: int, args: list) -> tuple[AsyncConnection, int, asyncio.Future]:
        conn = await self.connection()
        try:
            rid, future = conn.send(op, args)
        except ManagerUnavailable:
            # Found dead when sending (the Manager restarted): nothing was
            # applied, so sending again on a new connection is safe.
            conn = await self.connection()
            rid, future = conn.send(op, args)
        return conn, rid, future

    async def call(self, op: int, args: list, timeout: Any = USE_DEFAULT) -> Any:
        conn, rid, future = await self._send(op, args)
        if timeout is USE_DEFAULT:
            if conn.spin:
                conn.spin_for(future)
            if not future.done():
                conn.expire_after(rid, future, self.timeout)
            rop, payload = await future
            return _reply(rop, payload)
        handle = None
        if timeout is not None:
            handle = conn.loop.call_later(timeout, _expire, future, f"no reply from the Manager within {timeout}s")
        try:
            rop, payload = await future
        finally:
            if handle is not None:
                handle.cancel()
        return _reply(rop, payload)

    async def acquire(self, key: str, args: list, timeout: Any) -> Any:
        """LOCK_ACQUIRE: a task that goes away while it waits takes its wait back."""
        conn, rid, future = await self._send(F.LOCK_ACQUIRE, args)
        handle = None
        if timeout is not None:
            wait = self.timeout if timeout is USE_DEFAULT else timeout
            handle = conn.loop.call_later(wait, _expire, future, f"no reply from the Manager within {wait}s")
        _keep_beating(conn.loop, future)
        try:
            rop, payload = await future
        except BaseException:
            conn.abandon(rid, key, future)
            raise
        finally:
            if handle is not None:
                handle.cancel()
        return _reply(rop, payload)

    async def close(self) -> None:
        """Close this loop's connection (its locks are released; a later call opens a new one)."""
        loop = asyncio.get_running_loop()
        with self._mutex:
            conn = self._conns.pop(loop, None)
        if conn is not None:
            conn.close()

    def after_fork(self) -> None:
        """In a forked child: close the parent's connections, never touching its loops."""
        self._pid = os.getpid()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns = weakref.WeakKeyDictionary()
        self._connecting = weakref.WeakKeyDictionary()
        self._mutex = threading.Lock()


# -- embedded -------------------------------------------------------------------------------


class _LoopSession:
    """One event loop's session on the embedded engine (a connection's counterpart)."""

    def __init__(self, transport: EmbeddedTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.session = transport.engine.open_session(pid=os.getpid())
        self.rid = 0
        #: rid -> the future of a queued acquire; then rid -> its answer, once delivered
        self.waiting: dict[int, asyncio.Future] = {}
        self.answers: dict[int, Any] = {}
        self.ticker: asyncio.Task | None = None
        self.session.deliver = self.deliver

    def deliver(self, rid: int, result) -> None:
        """Called by the engine under the transport's mutex, from any thread."""
        future = self.waiting.pop(rid, None)
        loop = self._loop()
        if future is not None and loop is not None and not loop.is_closed():
            self.answers[rid] = result
            loop.call_soon_threadsafe(_resolve, future, result)


def _resolve(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


class AsyncEmbeddedTransport:
    """The sync client's embedded engine, awaited: its data, its locks, its limits."""

    name = "embedded"
    remote = False

    def __init__(self, sync: EmbeddedTransport) -> None:
        self.sync = sync
        self.timeout = sync.timeout
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSession] = weakref.WeakKeyDictionary()

    @property
    def limits(self) -> Limits:
        return self.sync.limits

    def _session(self, loop: asyncio.AbstractEventLoop) -> _LoopSession:
        state = self._sessions.get(loop)
        if state is None:
            state = self._sessions[loop] = _LoopSession(self.sync, loop)
            # When the loop goes, its session goes (and the locks its tasks
            # held), as a socket connection does: through the transport's list
            # of dead sessions, closed under the mutex by its next caller (a
            # finalizer may run anywhere, even under the mutex).
            weakref.finalize(loop, self.sync._dead.append, state.session)
        return state

    async def call(self, op: int, args: list, timeout: Any = USE_DEFAULT) -> Any:
        return self._dispatch(op, args)[2]

    def _dispatch(self, op: int, args: list) -> tuple[_LoopSession, int, Any]:
        """One request on the engine, in this loop's session: (session, rid, result).
        A lock acquire that has to wait gets a future in ``session.waiting``."""
        sync = self.sync
        loop = asyncio.get_running_loop()
        with sync.mutex:
            sync.housekeeping()
            state = self._session(loop)
            state.rid += 1
            rid = state.rid
            result = sync.engine.dispatch(state.session, op, args, rid)
            if result is DEFERRED:
                state.waiting[rid] = loop.create_future()
            else:
                sync.mutex.notify_all()
            return state, rid, result

    async def acquire(self, key: str, args: list, timeout: Any) -> Any:
        sync = self.sync
        loop = asyncio.get_running_loop()
        state, rid, result = self._dispatch(F.LOCK_ACQUIRE, args)
        if result is not DEFERRED:
            return result
        future = state.waiting[rid]
        if state.ticker is None or state.ticker.done():
            state.ticker = loop.create_task(self._tick_while_waiting(state))
        try:
            await future
        except BaseException:
            with sync.mutex:
                if state.waiting.pop(rid, None) is not None:
                    sync.engine.locks.cancel(state.session, key, rid)  # still queued: taken back
                else:
                    granted = state.answers.pop(rid, None)  # answered meanwhile: a grant goes back
                    if granted:
                        sync.engine.dispatch(state.session, F.LOCK_RELEASE, [key, granted[0]], 0)
                        sync.mutex.notify_all()
            raise
        return state.answers.pop(rid)

    async def _tick_while_waiting(self, state: _LoopSession) -> None:
        """While the loop has lock waits, move the engine's clock (leases, wait
        deadlines): one task per loop, however many tasks wait."""
        sync = self.sync
        while state.waiting:
            await asyncio.sleep(sync.wait_slice)
            with sync.mutex:
                sync.housekeeping()
                sync.mutex.notify_all()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        state = self._sessions.pop(loop, None)
        if state is not None:
            with self.sync.mutex:
                self.sync.engine.close_session(state.session)
                self.sync.mutex.notify_all()

    def after_fork(self) -> None:
        self._sessions = weakref.WeakKeyDictionary()


# -- the API -----------------------------------------------------------------------------------


class AsyncKeyspace:
    """The awaitable operations on one namespace: the twin of :class:`~.client.Keyspace`.

    Method names are the sync ones with an ``a`` (Django's ``aget``, ``aset``...)."""

    def __init__(self, sync: Keyspace, aio: AsyncClient) -> None:
        self._sync = sync
        self._aio = aio

    def __repr__(self) -> str:
        return f"<AsyncKeyspace {self._sync._ns!r}>"

    async def _written(self, keys) -> None:
        dispatcher = self._sync._client._dispatcher
        if dispatcher is not None and dispatcher._index and dispatcher.listens(self._sync._ns, keys):
            # This process listens to these keys: its own callbacks run before the write returns.
            await asyncio.to_thread(dispatcher.sync, self._sync._client.transport.timeout)

    async def _ready(self) -> Keyspace:
        """The sync keyspace, once its client knows the limits (learnt here
        by the awaitable handshake: the sync helpers must not connect)."""
        ks = self._sync
        if ks._client._max_key < 0:
            await self._aio.learn_limits()
        return ks

    async def aget(self, key: str, default: Any = None) -> Any:
        ks = await self._ready()
        key = ks._key(key)
        near = ks._near_cache
        if near is not None:
            data = await near.aget(key, self._aio.transport.call)
        else:
            data = await self._aio.transport.call(F.GET, [ks._ns, key])
        return default if data is None else ks.serializer.loads(data)

    async def aset(self, key: str, value: Any, timeout: float | None = None) -> None:
        ks = await self._ready()
        key = ks._key(key)
        transport = self._aio.transport
        await transport.call(F.SET, ks._write_args(key, ks._value(value, transport), A.timeout(timeout)))
        await self._written((key,))

    async def aremove(self, key: str) -> bool:
        ks = await self._ready()
        key = ks._key(key)
        existed = await self._aio.transport.call(F.REMOVE, [ks._ns, key])
        await self._written((key,))
        return existed

    adelete = aremove

    async def ahas(self, key: str) -> bool:
        ks = await self._ready()
        return await self._aio.transport.call(F.HAS, [ks._ns, ks._key(key)])

    ahas_key = ahas

    async def aadd(self, key: str, value: Any, timeout: float | None = None) -> bool:
        ks = await self._ready()
        key = ks._key(key)
        transport = self._aio.transport
        stored = await transport.call(F.ADD, ks._write_args(key, ks._value(value, transport), A.timeout(timeout)))
        await self._written((key,))
        return stored

    async def aincr(self, key: str, delta: int = 1, *, default: int | None = 0) -> int:
        ks = await self._ready()
        key = ks._key(key)
        delta = A.integer(delta, "delta")
        initial = None if default is None else A.integer(default, "default")
        value = await self._aio.transport.call(F.INCR, ks._write_args(key, delta, initial))
        await self._written((key,))
        return value

    async def adecr(self, key: str, delta: int = 1, *, default: int | None = 0) -> int:
        return await self.aincr(key, -A.integer(delta, "delta"), default=default)

    async def atouch(self, key: str, timeout: float | None = None) -> bool:
        ks = await self._ready()
        key = ks._key(key)
        found = await self._aio.transport.call(F.TOUCH, [ks._ns, key, A.timeout(timeout)])
        await self._written((key,))
        return found

    async def aget_many(self, keys: Iterable[str]) -> dict:
        ks = await self._ready()
        checked = [ks._key(k) for k in keys]
        near = ks._near_cache
        if near is not None:
            found = await near.aget_many(checked, self._aio.transport.call)
        else:
            found = await self._aio.transport.call(F.GET_MANY, [ks._ns, checked])
        loads = ks.serializer.loads
        return {key: loads(data) for key, data in found.items()}

    async def aset_many(self, mapping: Mapping[str, Any], timeout: float | None = None) -> None:
        ks = await self._ready()
        transport = self._aio.transport
        items, keys = ks._set_many_items(mapping, transport)
        await transport.call(F.SET_MANY, ks._write_args(items, A.timeout(timeout)))
        await self._written(keys)

    async def adelete_many(self, keys: Iterable[str]) -> int:
        ks = await self._ready()
        checked = [ks._key(k) for k in keys]
        count = await self._aio.transport.call(F.DELETE_MANY, [ks._ns, checked])
        await self._written(checked)
        return count

    async def aclear(self) -> int:
        count = await self._aio.transport.call(F.CLEAR, [self._sync._ns])
        await self._written(None)
        return count

    # -- expiry and key-space scans (the sync Keyspace's, awaited) --------------------------

    async def attl(self, key: str) -> float | int | None:
        ks = await self._ready()
        exists, left = await self._aio.transport.call(F.TTL, [ks._ns, ks._key(key)])
        return left if exists else 0

    async def aexpire(self, key: str, timeout: float | timedelta | None) -> bool:
        ks = await self._ready()
        key = ks._key(key)
        found = await self._aio.transport.call(F.TOUCH, [ks._ns, key, A.expire_timeout(timeout)])
        await self._written((key,))
        return found

    async def aexpire_at(self, key: str, when: datetime | float) -> bool:
        return await self.aexpire(key, A.seconds_until(when))

    async def apersist(self, key: str) -> bool:
        ks = await self._ready()
        return await self._aio.transport.call(F.PERSIST, [ks._ns, ks._key(key)])

    async def areplace(self, key: str, value: Any, timeout: float | None = None) -> bool:
        ks = await self._ready()
        key = ks._key(key)
        transport = self._aio.transport
        stored = await transport.call(F.REPLACE, ks._write_args(key, ks._value(value, transport), A.timeout(timeout)))
        await self._written((key,))
        return stored

    async def akeys(self, prefix: str = "", *, pattern: str | None = None) -> list[str]:
        if pattern is None:
            return await self._aio.transport.call(F.KEYS, [self._sync._ns, A.prefix(prefix)])
        if prefix:
            raise ArgumentTypeError("keys() takes a prefix or a pattern=, not both")
        ks = await self._ready()
        return await self._aio.transport.call(F.KEYS_MATCH, [ks._ns, A.pattern(pattern, ks._client.limits.max_key)])

    def aiter_keys(self, pattern: str = "*", *, itersize: int = A.DEFAULT_ITERSIZE) -> AsyncIterator[str]:
        """An async generator (``async for key in ...``): :meth:`Keyspace.iter_keys`, awaited."""
        A.itersize(itersize)  # a wrong type fails here, not at the first step
        return self._ascan(F.SCAN, pattern, itersize)

    async def _ascan(self, op: int, pattern: str, itersize: int) -> AsyncIterator[str]:
        ks = await self._ready()
        args = [ks._ns, 0, A.pattern(pattern, ks._client.limits.max_key), itersize]
        call = self._aio.transport.call
        while True:
            cursor, keys = await call(op, args)
            for key in keys:
                yield key
            if not cursor:
                return
            args[1] = cursor

    async def adelete_pattern(self, pattern: str, *, itersize: int = A.DEFAULT_ITERSIZE) -> int:
        ks = await self._ready()
        args = [ks._ns, 0, A.pattern(pattern, ks._client.limits.max_key), A.itersize(itersize)]
        call = self._aio.transport.call
        removed = 0
        while True:
            cursor, count = await call(F.SCAN_DELETE, args)
            removed += count
            if not cursor:
                break
            args[1] = cursor
        if removed:
            await self._written(None)
        return removed


class AsyncClient(AsyncKeyspace):
    """The whole API, awaitable, over the async twin of a sync client's transport."""

    def __init__(self, sync: Client) -> None:
        from .embedded import EmbeddedTransport
        from .socket import SocketTransport

        transport = sync.transport
        self.transport: AsyncSocketTransport | AsyncEmbeddedTransport
        if isinstance(transport, SocketTransport):
            self.transport = AsyncSocketTransport(
                transport.address, transport.secret, timeout=transport.timeout, spin=transport.spin
            )
        elif isinstance(transport, EmbeddedTransport):
            self.transport = AsyncEmbeddedTransport(transport)
        elif hasattr(transport, "async_twin"):  # a transport that brings its own (the Redis engine's)
            self.transport = transport.async_twin()
        else:  # pragma: no cover
            raise TypeError(f"no asyncio twin for {type(transport).__name__}")
        super().__init__(sync, self)
        self.sync = sync
        self._caches: dict[tuple, AsyncKeyspace] = {}
        self._held: weakref.WeakKeyDictionary[asyncio.Task, dict] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.transport!r}>"

    def cache(self, name: str, **bounds) -> AsyncKeyspace:
        """The named cache ``name`` (see :meth:`Client.cache`), awaitable."""
        key = (name, tuple(sorted(bounds.items())))
        space = self._caches.get(key)
        if space is None:
            space = self._caches[key] = AsyncKeyspace(self.sync.cache(name, **bounds), self)
        return space

    def keyspace(self, sync: Keyspace) -> AsyncKeyspace:
        """The awaitable twin of a sync keyspace of this client (the cache backend's)."""
        return AsyncKeyspace(sync, self)

    def holds(self) -> dict:
        """The locks the current task holds through AsyncLock objects of this client: key -> hold."""
        task = asyncio.current_task()
        table = self._held.get(task)  # type: ignore[arg-type]
        if table is None:
            table = self._held[task] = {}  # type: ignore[index]
        return table

    async def learn_limits(self) -> None:
        """Learn the limits by an awaitable handshake (never the sync client's blocking connect)."""
        transport = self.transport
        if isinstance(transport, AsyncSocketTransport):
            conn = await transport.connection()
            sync_transport = self.sync.transport
            if getattr(sync_transport, "_limits", None) is None:
                sync_transport._limits = conn.limits
        self.sync.limits  # noqa: B018 - sets the client's key-length fast path

    # -- locks (django_clustershm.AsyncLock holds the user-facing API) --------------------------

    async def alock_acquire(self, key: str, lease: float | None = None, wait: float | None = None) -> list | None:
        """``[token, fence]``, or None if not acquired within ``wait`` seconds
        (None: wait forever, 0 or less: do not wait). A task cancelled while it
        waits leaves no lock held and no wait queued."""
        if self.sync._max_key < 0:
            await self.learn_limits()
        key = self.sync._key(key)
        if lease is not None:
            lease = A.positive_seconds(lease, "lease")
        if wait is not None and type(wait) is not int:
            wait = A.timeout(wait, "timeout")
        if wait is None:
            reply_timeout = None
        elif wait <= 0:
            reply_timeout = USE_DEFAULT
        else:
            reply_timeout = wait + self.transport.timeout
        return await self.transport.acquire(key, [key, lease, wait], reply_timeout)

    async def alock_release(self, key: str, token: bytes) -> bool:
        return await self.transport.call(F.LOCK_RELEASE, [self.sync._key(key), A.token(token)])

    async def alock_extend(self, key: str, token: bytes, lease: float | None) -> bool:
        return await self.transport.call(
            F.LOCK_EXTEND, [self.sync._key(key), A.token(token), A.positive_seconds(lease, "lease")]
        )

    async def alock_status(self, key: str, token: bytes | None = None) -> list:
        return await self.transport.call(
            F.LOCK_STATUS, [self.sync._key(key), None if token is None else A.token(token)]
        )

    # -- the rest --------------------------------------------------------------------------------

    async def astats(self) -> dict:
        return await self.transport.call(F.STATS, [])

    async def aping(self) -> bool:
        return await self.transport.call(F.PING, []) == "pong"

    async def aclose(self) -> None:
        """Close this event loop's connection or session: the locks it held are released."""
        await self.transport.close()

    def after_fork(self) -> None:
        self.transport.after_fork()
        self._held = weakref.WeakKeyDictionary()


__all__ = [
    "AsyncClient",
    "AsyncConnection",
    "AsyncEmbeddedTransport",
    "AsyncKeyspace",
    "AsyncSocketTransport",
]
