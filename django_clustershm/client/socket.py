"""The socket transport: a Manager over its Unix socket.

:class:`SocketTransport` keeps one connection per thread, made lazily (Django's
sync views run on threads with ``gthread``). Every call has a timeout. A
connection found dead when *sending* (the Manager restarted) is replaced and
the request sent once more: on a Unix socket a send to a closed peer fails at
once, so the request cannot have been applied. A connection that dies while
waiting for a reply is dropped and the call fails: the request may have been
applied, and a retry could apply it twice (an ``incr``).

Every connection kind (a thread's request connection, a listener channel, a
near-cache tracker channel) is a :class:`Connection`: one handshake, one
frame reader and one receive primitive (:meth:`Connection.recv_frames`).
The transport records every connection it makes, so that a forked child
closes its copies of all of them (:meth:`SocketTransport.after_fork`) and
never writes into its parent's sockets (which would interleave frames of two
processes on one stream).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any

from ..exceptions import (
    ClusterShmError,
    InvalidKey,
    ManagerUnavailable,
    ProtocolError,
    ValueTooLarge,
    error_from_code,
)
from ..wire import frames as F
from ..wire import handshake as H
from ..wire.limits import Limits
from .transport import DEFAULT_TIMEOUT, USE_DEFAULT, Channel, Message, Transport, beat, heartbeat

#: Seconds a call polls for its reply before it sleeps (0: never).
#: Waking a sleeping process on another CPU costs 20-40 us on a small VM, more
#: than most replies take to come; polling briefly answers them without that
#: cost (bench/bench_core.py: get 32 -> 10 us, one process 38k -> 98k ops/s).
#: It adapts: a poll that times out (a busy machine, where polling would take
#: CPU from the Manager) disables polling for the next 1, 3, 7... 256 calls,
#: so 4 processes on 2 CPUs keep their throughput.
DEFAULT_SPIN = 20e-6
_RECV_SIZE = 64 * 1024  # under glibc's mmap threshold: a larger recv() buffer costs an mmap+munmap per call
#: Hints (RECENT reports) a channel keeps unsent at most (past that, the
#: Manager is not reading it: new hints are dropped).
_MAX_POST_BACKLOG = 1 << 20
_encode = F.encode
_encode_parts = F.encode_parts
_decode = F.decode_payload
_decode_reply = F.decode_reply
_OK = F.OK
_ERR = F.ERR


class HandshakeLost(ManagerUnavailable):
    """The Manager closed a connection before its handshake completed, without a
    refusal: it dropped it (half-open peers have a small cap, the oldest making
    room for a new one, README "A rogue or broken client"). Nothing was sent
    yet, so connecting again is safe: :meth:`SocketTransport.connect` does, twice."""


#: Attempts at a connection whose handshake the Manager dropped.
HANDSHAKE_ATTEMPTS = 3


#: Requests whose arguments carry values (at the top of the list, or in SET_MANY's items: where
#: encode_parts looks).
_VALUE_OPS = frozenset({F.SET, F.ADD, F.REPLACE, F.SET_MANY})


def request_frame(op: int, rid: int, args: list, max_frame: int) -> bytes | list:
    """One request, encoded and checked against the frame limit (both socket transports): its
    bytes, or for a request carrying a big value the buffers to send in turn
    (:func:`..wire.frames.encode_parts`: the value is not copied)."""
    try:
        frame = _encode_parts(op, rid, args) if op in _VALUE_OPS else _encode(op, rid, args)
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"a key cannot be encoded as UTF-8: {exc}") from exc
    if type(frame) is list:
        if len(frame) == 1:
            frame = frame[0]
        size = len(frame) if type(frame) is bytes else F.parts_size(frame)
    else:
        size = len(frame)
    if size - F.HEADER_SIZE > max_frame:
        raise ValueTooLarge(
            f"request of {size} bytes exceeds the maximum frame of {max_frame}; send fewer items at once"
        )
    return frame


def send_parts(sock: socket.socket, parts: bytes | list) -> None:
    """Send what :func:`request_frame` made on a blocking socket: ``sendall()`` for bytes, else
    ``sendmsg()`` until all went (a big value goes from its own buffer to the kernel, as a view
    when a send stops inside it)."""
    if isinstance(parts, bytes):
        sock.sendall(parts)
        return
    left = [memoryview(part) for part in parts]
    while left:
        sent = sock.sendmsg(left)
        while left and sent >= len(left[0]):
            sent -= len(left[0])
            del left[0]
        if sent:
            left[0] = left[0][sent:]


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class Connection:
    """One authenticated connection to the Manager."""

    __slots__ = (
        "__weakref__",
        "limits",
        "lock_poll",
        "poll",
        "reader",
        "rid",
        "session_id",
        "sock",
        "spin",
        "spin_backoff",
        "spin_skip",
        "timeout",
    )

    def __init__(self, address: str, secret: bytes, timeout: float, spin: float = 0.0) -> None:
        self.timeout = timeout
        self.spin = spin
        self.rid = 0
        self.spin_skip = 0
        self.spin_backoff = 0
        self.lock_poll = True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = sock
        self.reader = F.FrameReader(F.HANDSHAKE_MAX_FRAME)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ManagerUnavailable(f"no Manager is listening on {address} ({exc.strerror})") from exc
            except OSError as exc:
                raise ManagerUnavailable(f"cannot connect to the Manager on {address}: {exc}") from exc
            op, _rid, payload = self._handshake_frame()
            auth, client_nonce = H.answer_hello(op, payload, secret)
            try:
                sock.sendall(auth)
            except OSError as exc:
                # Dropped after its HELLO (the half-open cap's oldest): a peer
                # that learns it by sending gets EPIPE, not an EOF. The AUTH
                # never arrived, so connecting again is safe (HandshakeLost).
                raise HandshakeLost(f"the Manager closed the connection during the handshake: {exc}") from exc
            op, _rid, payload = self._handshake_frame()
            self.limits, self.session_id = H.check_welcome(op, payload, secret, client_nonce)
            self.reader.max_frame = self.limits.max_frame
            # From here on the socket is blocking with kernel timeouts: one
            # recv() per reply, without the poll() that settimeout() adds.
            sock.settimeout(None)
            tv = _timeval(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except BaseException:
            sock.close()
            raise
        # Polling for a reply asks poll(2) (0.3 us when there is nothing)
        # rather than a recv() that fails with EAGAIN (1 us: an exception).
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)

    def _handshake_frame(self):
        while True:
            try:
                data = self.sock.recv(F.HANDSHAKE_MAX_FRAME)
            except TimeoutError as exc:
                raise ManagerUnavailable(f"the Manager did not complete the handshake within {self.timeout}s") from exc
            except OSError as exc:
                raise HandshakeLost(f"the Manager closed the connection during the handshake: {exc}") from exc
            if not data:
                raise HandshakeLost("the Manager closed the connection during the handshake")
            frames = self.reader.feed(data)
            if frames:
                return frames[0]

    def recv_frames(self, flags: int = 0) -> list | None:
        """The one receive primitive of every connection kind: one ``recv()``,
        fed to the frame reader. The frames completed (maybe none); None if
        nothing could be read (EAGAIN: a non-blocking read found nothing, or
        SO_RCVTIMEO ran out). A closed or broken stream is ManagerUnavailable."""
        reader = self.reader
        try:
            if reader.big is not None:  # the rest of a big reply: straight into its buffer
                count = self.sock.recv_into(reader.room(), 0, flags)
                if count:
                    return self.reader.filled(count)
                data = b""
            else:
                data = self.sock.recv(_RECV_SIZE, flags)
        except (TimeoutError, BlockingIOError):
            return None
        except OSError as exc:
            raise ManagerUnavailable(f"lost the connection to the Manager: {exc}") from exc
        if not data:
            raise ManagerUnavailable("the Manager closed the connection")
        return self.reader.feed(data)

    def wait_reply(self, rid: int, timeout: Any = USE_DEFAULT, learn: bool = True):
        """Wait for the reply to ``rid``: poll first (see DEFAULT_SPIN), then
        block in recv(). Return ``(opcode, payload)``.

        A ``timeout`` other than the connection's (a lock wait: seconds, or
        None for no limit) is given to the socket only when the wait blocks,
        and taken back after: an acquire answered while polling costs no
        setsockopt() (2 of them: 2 us). A lock wait (``learn=False``) polls
        only while this connection's acquires are answered at once: once one
        is queued (PUSH_QUEUED), the next ones sleep, since polling for a
        contended lock takes CPU from its holder; and a long wait does not
        teach the connection to stop polling for the quick requests that follow.

        A lock wait of a process that registered a heartbeat
        (:func:`.transport.set_heartbeat`: a gunicorn worker's ``notify``)
        blocks in slices of the heartbeat's interval and calls it as it
        starts to block and between slices, so that gunicorn does not kill a
        worker that waits for a lock as hung: the lock's timeout decides.
        """
        own_timeout = timeout is not USE_DEFAULT
        timeout_set = False
        queued = False
        pulse = None
        deadline = None
        rcvtimeo = -1.0
        spin_until = 0.0
        if self.spin:
            if learn:
                if self.spin_skip:
                    self.spin_skip -= 1
                else:
                    spin_until = time.perf_counter() + self.spin
            elif self.lock_poll:
                spin_until = time.perf_counter() + self.spin
        poll = self.poll.poll
        try:
            while True:
                frames = None
                while spin_until:
                    if poll(0):
                        frames = self.recv_frames(socket.MSG_DONTWAIT)
                        if frames is None:
                            continue
                        if learn:
                            self.spin_backoff = 0
                        break
                    if time.perf_counter() > spin_until:
                        # The reply is slow to come (a busy machine): stop
                        # polling for a while, longer each time it fails.
                        if learn:
                            self.spin_backoff = min(self.spin_backoff * 2 + 1, 256)
                            self.spin_skip = self.spin_backoff
                        spin_until = 0.0
                if frames is None:
                    if not own_timeout:
                        frames = self.recv_frames()
                    else:
                        if not timeout_set:
                            timeout_set = True
                            pulse = heartbeat()
                            if timeout is not None:
                                deadline = time.monotonic() + timeout
                        while True:  # one pass, or one per heartbeat
                            if pulse is None:
                                wait = 0.0 if timeout is None else max(timeout, 1e-3)  # 0: no limit
                            else:
                                beat(pulse[0])
                                wait = pulse[1]
                                if deadline is not None:
                                    wait = max(min(wait, deadline - time.monotonic()), 1e-3)
                            if wait != rcvtimeo:
                                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(wait))
                                rcvtimeo = wait
                            frames = self.recv_frames()
                            if frames is not None or pulse is None:
                                break
                            if deadline is not None and time.monotonic() >= deadline:
                                break
                    if frames is None:
                        limit = self.timeout if not own_timeout else timeout or "no limit"
                        raise ManagerUnavailable(f"no reply from the Manager within {limit}s")
                for op, frid, payload in frames:
                    if op == F.PUSH_QUEUED and frid == rid:
                        spin_until = 0.0  # a lock wait that will take a while: sleep, do not poll
                        queued = True
                        continue
                    if op >= F.PUSH_MIN:
                        continue  # a request connection subscribes to nothing
                    if frid != rid:
                        raise ProtocolError(f"reply for request {frid} while waiting for {rid}")
                    if not learn:
                        self.lock_poll = not queued
                    return op, payload
        finally:
            if timeout_set:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
                except OSError:
                    pass  # the connection is broken: the caller drops it

    def close(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()

    # A thread's connection goes when its thread-local storage goes.
    __del__ = close


class SocketTransport(Transport):
    """A Manager at ``address`` (same user, same host); one lazy connection per thread."""

    name = "socket"
    remote = True
    near_by_default = True
    splices = True
    yields_on_handoff = True

    def __init__(
        self, address: str, secret: bytes, *, timeout: float = DEFAULT_TIMEOUT, spin: float = DEFAULT_SPIN
    ) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.spin = spin
        self._local = threading.local()
        self._limits: Limits | None = None
        # Every connection and channel made in this process (any thread), so
        # that a forked child closes its copies of all of them.
        self._made: weakref.WeakSet = weakref.WeakSet()

    @property
    def stamps_file(self) -> str:
        return self.address + F.STAMPS_SUFFIX

    def __repr__(self) -> str:
        return f"<SocketTransport {self.address}>"

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            self._connection()
        return self._limits  # type: ignore[return-value]

    def connect(self, spin: float | None = None) -> Connection:
        """A new authenticated connection (the caller owns it)."""
        spin = self.spin if spin is None else spin
        for attempt in range(HANDSHAKE_ATTEMPTS - 1):
            try:
                conn = Connection(self.address, self.secret, self.timeout, spin)
                break
            except HandshakeLost:
                time.sleep(0.01 * (attempt + 1))
        else:
            conn = Connection(self.address, self.secret, self.timeout, spin)
        self._limits = conn.limits
        self._made.add(conn)
        return conn

    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        return conn

    def _drop(self, conn: Connection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def call(self, op: int, args: list, timeout: Any = USE_DEFAULT) -> Any:
        conn = self._connection()
        conn.rid = rid = (conn.rid + 1) & 0xFFFFFFFF or 1
        frame = request_frame(op, rid, args, conn.limits.max_frame)
        try:
            if type(frame) is bytes:  # the common case, without a call
                conn.sock.sendall(frame)
            else:
                send_parts(conn.sock, frame)
        except OSError as exc:
            self._drop(conn)
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise ManagerUnavailable(f"cannot send to the Manager: {exc}") from exc
            # The Manager closed this connection before reading the request
            # (it restarted): nothing was applied, so sending again is safe.
            conn = self._connection()
            conn.rid = rid
            try:
                send_parts(conn.sock, frame)
            except OSError as exc2:
                self._drop(conn)
                raise ManagerUnavailable(f"cannot send to the Manager: {exc2}") from exc2
        try:
            if timeout is USE_DEFAULT:
                rop, payload = conn.wait_reply(rid)
            else:
                rop, payload = conn.wait_reply(rid, timeout, learn=False)
        except BaseException:
            # A timeout, a lost Manager, or an interruption (KeyboardInterrupt,
            # gunicorn's worker abort) while a reply may still come: the
            # stream's state is unknown, so the connection goes. The Manager
            # then drops whatever this connection held or waited for.
            self._drop(conn)
            raise
        result = _decode(payload) if type(payload) is bytes else _decode_reply(payload)
        if rop == _OK:
            return result
        if rop == _ERR:
            raise error_from_code(result[0], result[1])
        self._drop(conn)
        raise ProtocolError(f"unexpected reply opcode 0x{rop:02x}")

    def open_channel(self) -> SocketChannel:
        return SocketChannel(self)

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._drop(conn)

    def after_fork(self) -> None:
        # Close the child's copies of every connection the parent had (in any
        # thread, channels included), then give the child empty thread-local state.
        for conn in list(self._made):
            conn.close()
        self._made = weakref.WeakSet()
        self._local = threading.local()


class SocketChannel(Channel):
    """A push channel over a connection of its own (non-blocking, woken by a socketpair)."""

    def __init__(self, transport: SocketTransport) -> None:
        super().__init__()
        self.conn = conn = transport.connect(spin=0.0)
        self.timeout = transport.timeout
        self.session_id = conn.session_id
        conn.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ready = select.poll()
        self._ready.register(conn.sock.fileno(), select.POLLIN)
        self._waiter = select.poll()
        self._waiter.register(conn.sock.fileno(), select.POLLIN)
        self._waiter.register(self._wake_r.fileno(), select.POLLIN)
        self._out = b""  # posted hints not yet sent
        self._closed = False
        self._lost: ClusterShmError | None = None
        transport._made.add(self)

    def _send_all(self, data: bytes) -> None:
        sock = self.conn.sock
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ManagerUnavailable(f"the Manager did not read this channel within {self.timeout}s") from None
                select.select([], [sock], [], left)
                continue
            except OSError as exc:
                raise ManagerUnavailable(f"lost the channel to the Manager: {exc}") from exc
            view = view[sent:]

    def send(self, op: int, rid: int, args: list) -> None:
        if self._out:
            self._flush_posts()
        self._send_all(_encode(op, rid, args))

    def post(self, op: int, args: list) -> None:
        if len(self._out) < _MAX_POST_BACKLOG:
            self._out += _encode(op, 0, args)
        self._flush_posts()

    def _flush_posts(self) -> None:
        try:
            sent = self.conn.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # lost: the next receive finds the socket closed
        self._out = self._out[sent:]

    def ready(self) -> bool:
        return bool(self._backlog) or self._lost is not None or bool(self._ready.poll(0))

    def _receive(self, timeout: float | None) -> list[Message]:
        if self._lost is not None:
            raise self._lost
        if timeout is None:
            ms = -1
        else:
            ms = max(0, int(timeout * 1000 + 0.999)) if timeout > 0 else 0
        try:
            events = self._waiter.poll(ms)
        except (OSError, ValueError) as exc:  # closed under us
            raise ManagerUnavailable(f"the channel was closed: {exc}") from exc
        messages: list[Message] = []
        if not events:
            return messages
        for fd, _mask in events:
            if fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
        conn = self.conn
        while True:
            try:
                frames = conn.recv_frames()
            except ClusterShmError as exc:
                if not messages:
                    raise
                self._lost = exc  # what came before the end is delivered first
                return messages
            if frames is None:  # EAGAIN: all that was there is read
                break
            for op, rid, payload in frames:
                messages.append((op, rid, _decode(payload)))
        if self._out:
            self._flush_posts()
        return messages

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.conn.close()
            self._wake_r.close()
            self._wake_w.close()
