"""Clients of the Manager: over its Unix socket, or embedded in this process.

:class:`Client` holds the whole API and everything done on the caller's
side: key checks, size limits, and serialisation (pickle, except native
64-bit integers so that ``incr`` works in the Manager). Its two transports
only move requests:

* :class:`SocketClient` keeps one connection per thread, made lazily. It is
  fork-safe: an at-fork hook closes a child's copies of the parent's
  connections and gives the child fresh thread-local state, so a child never
  writes into its parent's socket (which would interleave frames of two
  processes on one stream). Every call has a timeout. A connection found dead
  when sending (the Manager restarted) is replaced and the request sent once
  more; on a Unix socket a send to a closed peer fails at once, so the request
  cannot have been applied before. A connection that dies while waiting for a
  reply is dropped and the call fails: the request may have been applied, and
  a retry could apply it twice (an ``incr``).
* :class:`EmbeddedClient` calls an in-process :class:`~.engine.Engine` under
  one mutex, with the same engine code as the Manager, so the same semantics.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import select
import pickle
import socket
import struct
import threading
import time
import weakref
from typing import Any, Iterable, Mapping

from . import protocol as P
from .engine import DEFERRED, Engine, Limits
from .exceptions import (
    AuthenticationFailed,
    InvalidKey,
    KeyTooLarge,
    ManagerUnavailable,
    ProtocolError,
    SerializationError,
    ValueTooLarge,
    error_from_code,
)
from .store import INT64_MAX, INT64_MIN

logger = logging.getLogger("django_clustershm.client")

DEFAULT_TIMEOUT = 5.0
#: Seconds a client polls for its reply before it sleeps in recv() (0: never).
#: Waking a sleeping process on another CPU costs 20-40 us on a small VM, more
#: than most replies take to come; polling briefly answers them without that
#: cost (bench/bench_core.py: get 32 -> 10 us, one process 38k -> 98k ops/s).
#: It adapts: a poll that times out (a busy machine, where polling would take
#: CPU from the Manager) disables polling for the next 1, 3, 7... 256 calls,
#: so 4 processes on 2 CPUs keep their throughput (78k ops/s with or without).
DEFAULT_SPIN = 20e-6
_RECV_SIZE = 64 * 1024  # under glibc's mmap threshold: a larger recv() buffer costs an mmap+munmap per call
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_dumps = pickle.dumps
_loads = pickle.loads
_MISSING = object()


def encode_value(value: Any, max_value: int) -> bytes | int:
    """What the Manager stores for ``value``: a native int, or its pickle."""
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:
        return value
    try:
        data = _dumps(value, _PICKLE_PROTOCOL)
    except Exception as exc:  # PicklingError, TypeError, AttributeError...
        raise SerializationError(f"cannot pickle a value of type {type(value).__name__}: {exc}") from exc
    if len(data) > max_value:
        raise ValueTooLarge(f"value pickles to {len(data)} bytes; the maximum is {max_value} (MAX_VALUE_SIZE)")
    return data


def decode_value(data: bytes | int) -> Any:
    if type(data) is int:
        return data
    return _loads(data)


class Client:
    """The API shared by both transports. Subclasses implement :meth:`_call`."""

    limits: Limits

    def _call(self, op: int, args: list):  # pragma: no cover - abstract
        raise NotImplementedError

    def _key(self, key: str) -> str:
        if type(key) is not str:
            if isinstance(key, str):
                return self._key(str(key))
            raise InvalidKey(f"keys are str, not {type(key).__name__}")
        max_key = self.limits.max_key
        if key.isascii():
            if len(key) > max_key:
                raise KeyTooLarge(f"key is {len(key)} bytes; the maximum is {max_key} (MAX_KEY_SIZE)")
        else:
            try:
                size = len(key.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise InvalidKey(f"key cannot be encoded as UTF-8: {exc}") from exc
            if size > max_key:
                raise KeyTooLarge(f"key is {size} bytes in UTF-8; the maximum is {max_key} (MAX_KEY_SIZE)")
        return key

    def _value(self, value):
        return encode_value(value, self.limits.max_value)

    # -- the seed's operations -----------------------------------------------

    def get(self, key: str, default: Any = None, *, ns: str = "") -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired."""
        data = self._call(P.GET, [ns, self._key(key)])
        return default if data is None else decode_value(data)

    def set(self, key: str, value: Any, timeout: float | None = None, *, ns: str = "") -> None:
        """Store ``value`` under ``key``; ``timeout`` seconds until it expires (None: never)."""
        self._call(P.SET, [ns, self._key(key), self._value(value), timeout])

    def remove(self, key: str, *, ns: str = "") -> bool:
        """Remove ``key``; True if it existed."""
        return self._call(P.REMOVE, [ns, self._key(key)])

    delete = remove

    # -- more atomic operations ------------------------------------------------

    def has(self, key: str, *, ns: str = "") -> bool:
        return self._call(P.HAS, [ns, self._key(key)])

    def add(self, key: str, value: Any, timeout: float | None = None, *, ns: str = "") -> bool:
        """Store ``value`` only if ``key`` is absent; True if it was stored."""
        return self._call(P.ADD, [ns, self._key(key), self._value(value), timeout])

    def incr(self, key: str, delta: int = 1, *, default: int | None = 0, ns: str = "") -> int:
        """Add ``delta`` atomically and return the new value.

        A missing key starts from ``default``; with ``default=None`` a missing
        key raises :class:`KeyNotFound` instead (Django's cache semantics).
        """
        return self._call(P.INCR, [ns, self._key(key), _int(delta), None if default is None else _int(default)])

    def decr(self, key: str, delta: int = 1, *, default: int | None = 0, ns: str = "") -> int:
        return self.incr(key, -_int(delta), default=default, ns=ns)

    def touch(self, key: str, timeout: float | None = None, *, ns: str = "") -> bool:
        """Give ``key`` a new expiry (None: never expires); True if the key exists."""
        return self._call(P.TOUCH, [ns, self._key(key), timeout])

    def get_many(self, keys: Iterable[str], *, ns: str = "") -> dict:
        """The values of the keys that exist, in one round trip."""
        found = self._call(P.GET_MANY, [ns, [self._key(k) for k in keys]])
        return {key: decode_value(data) for key, data in found.items()}

    def set_many(self, mapping: Mapping[str, Any], timeout: float | None = None, *, ns: str = "") -> None:
        """Store every item in one round trip (all or none)."""
        encoded = {self._key(k): self._value(v) for k, v in mapping.items()}
        self._call(P.SET_MANY, [ns, encoded, timeout])

    def delete_many(self, keys: Iterable[str], *, ns: str = "") -> int:
        """Remove the keys in one round trip; return how many existed."""
        return self._call(P.DELETE_MANY, [ns, [self._key(k) for k in keys]])

    def keys(self, prefix: str = "", *, ns: str = "") -> list[str]:
        """The live keys that start with ``prefix`` (all keys by default)."""
        if type(prefix) is not str:
            raise InvalidKey("a prefix is a str")
        return self._call(P.KEYS, [ns, prefix])

    def clear(self, *, ns: str = "") -> int:
        """Remove every key of the namespace; return how many there were."""
        return self._call(P.CLEAR, [ns])

    # -- named caches (the Django backend's writes) ----------------------------------

    def cache_set(self, ns: str, key: str, value: Any, timeout: float | None, opts: list) -> None:
        """Store into cache ``ns``; ``opts`` is [max_entries, cull_frequency, max_bytes]."""
        self._call(P.CACHE_SET, [ns, self._key(key), self._value(value), timeout, opts])

    def cache_add(self, ns: str, key: str, value: Any, timeout: float | None, opts: list) -> bool:
        return self._call(P.CACHE_ADD, [ns, self._key(key), self._value(value), timeout, opts])

    def cache_set_many(self, ns: str, mapping: Mapping[str, Any], timeout: float | None, opts: list) -> None:
        encoded = {self._key(k): self._value(v) for k, v in mapping.items()}
        self._call(P.CACHE_SET_MANY, [ns, encoded, timeout, opts])

    # -- locks (see django_clustershm.lock for the user-facing API) -----------------------

    def lock_acquire(self, key: str, lease: float | None = None, wait: float | None = None):
        """``[token, fence]``, or None if not acquired within ``wait`` seconds (None: forever, 0: try)."""
        if wait is None:
            reply_timeout = 0  # no limit: the Manager answers when the lock is granted
        elif wait <= 0:
            reply_timeout = None
        else:
            reply_timeout = wait + getattr(self, "timeout", DEFAULT_TIMEOUT)
        return self._call(P.LOCK_ACQUIRE, [self._key(key), _seconds(lease), _seconds(wait)], reply_timeout)

    def lock_release(self, key: str, token: bytes) -> bool:
        """Release; True if the lock went to a waiter, False if it is free now."""
        handed_over = self._call(P.LOCK_RELEASE, [self._key(key), token])
        if handed_over:
            # The next holder was just woken, most likely onto this CPU's run
            # queue (it slept in recv() here): let it run now rather than when
            # this thread next blocks. Go's sync.Mutex does the same on a
            # hand-off (semrelease with handoff=true yields). Measured with
            # bench_locks.py, 4 processes on 2 CPUs: the new holder's first
            # round trip 21 -> 9 us, locked read-modify-write 14.4k -> 17.8k ops/s.
            os.sched_yield()
        return handed_over

    def lock_extend(self, key: str, token: bytes, lease: float | None) -> bool:
        return self._call(P.LOCK_EXTEND, [self._key(key), token, _seconds(lease)])

    def lock_status(self, key: str, token: bytes | None = None) -> list:
        """``[locked, owned]``: held by anyone; held with ``token``."""
        return self._call(P.LOCK_STATUS, [self._key(key), token])

    def stats(self) -> dict:
        """The Manager's figures: keys, bytes, hits, ops/s, connected clients..."""
        return self._call(P.STATS, [])

    def ping(self) -> bool:
        return self._call(P.PING, []) == "pong"

    def close(self) -> None:
        """Release what this client holds in this process (it stays usable)."""


def _seconds(value):
    if value is None or type(value) in (int, float):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"expected seconds as a number, got {type(value).__name__}")


def _int(n) -> int:
    if type(n) is not int:
        if isinstance(n, int):  # bool, IntEnum
            return int(n)
        raise TypeError(f"expected an int, got {type(n).__name__}")
    return n


# -- over the socket ---------------------------------------------------------------

_live_connections: "weakref.WeakSet[_Connection]" = weakref.WeakSet()
_socket_clients: "weakref.WeakSet[SocketClient]" = weakref.WeakSet()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class _Connection:
    """One authenticated connection, used by one thread at a time."""

    __slots__ = (
        "sock", "reader", "limits", "session_id", "rid", "timeout", "spin", "spin_skip", "spin_backoff", "lock_poll",
        "poll", "__weakref__",
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
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ManagerUnavailable(f"no Manager is listening on {address} ({exc.strerror})") from exc
            except OSError as exc:
                raise ManagerUnavailable(f"cannot connect to the Manager on {address}: {exc}") from exc
            self._handshake(secret)
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
        _live_connections.add(self)

    def _read_frame(self):
        while True:
            try:
                data = self.sock.recv(P.HANDSHAKE_MAX_FRAME)
            except socket.timeout as exc:
                raise ManagerUnavailable(f"the Manager did not complete the handshake within {self.timeout}s") from exc
            except OSError as exc:
                raise ManagerUnavailable(f"the Manager closed the connection during the handshake: {exc}") from exc
            if not data:
                raise AuthenticationFailed("the Manager closed the connection during the handshake")
            frames = self.reader.feed(data)
            if frames:
                return frames[0]

    def _handshake(self, secret: bytes) -> None:
        self.reader = P.FrameReader(P.HANDSHAKE_MAX_FRAME)
        op, _rid, payload = self._read_frame()
        if op != P.HELLO:
            raise ProtocolError(f"expected HELLO from the Manager, got opcode 0x{op:02x}")
        version, server_nonce, _manager_pid = P.decode_payload(payload)
        if version != P.VERSION:
            raise AuthenticationFailed(f"the Manager speaks protocol {version}, this client {P.VERSION}")
        client_nonce = os.urandom(P.NONCE_SIZE)
        self.sock.sendall(P.encode(P.AUTH, 0, [P.client_proof(secret, server_nonce), client_nonce, os.getpid()]))
        op, _rid, payload = self._read_frame()
        reply = P.decode_payload(payload)
        if op == P.ERR:
            raise AuthenticationFailed(f"the Manager refused this client: {reply[1]}")
        proof, limits, self.session_id = reply
        if not hmac.compare_digest(proof, P.server_proof(secret, client_nonce)):
            raise AuthenticationFailed("the process on the socket does not hold the cluster secret")
        self.limits = Limits(limits["max_key"], limits["max_value"], limits["max_frame"])
        self.reader.max_frame = self.limits.max_frame

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def receive(self, rid: int, timeout=None):
        """Wait for the reply to ``rid``; return ``(opcode, payload)``.

        ``timeout`` overrides the connection's for this reply (a lock wait):
        a number of seconds, or 0 for no limit.
        """
        if timeout is not None:
            # A lock wait: polled (an uncontended acquire answers at once),
            # but a long wait must not teach the connection to stop polling
            # for the quick requests of the critical section that follows.
            return self._receive(rid, timeout, learn=False)
        return self._receive(rid, self.timeout)

    def _receive(self, rid: int, timeout, learn: bool = True):
        """Wait for the reply to ``rid``: poll first, then block in recv().

        A ``timeout`` other than the connection's (a lock wait) is given to the
        socket only when the wait blocks, and taken back after: an acquire
        answered while polling costs no setsockopt() (2 of them: 2 us).
        """
        reader = self.reader
        sock = self.sock
        own_timeout = timeout is not self.timeout
        timeout_set = False
        queued = False
        spin_until = 0.0
        if self.spin:
            if learn:
                if self.spin_skip:
                    self.spin_skip -= 1
                else:
                    spin_until = time.perf_counter() + self.spin
            elif self.lock_poll:
                # A lock wait polls only while this connection's acquires are
                # answered at once: once one is queued, the next ones sleep
                # (polling for contended locks takes CPU from the holder).
                spin_until = time.perf_counter() + self.spin
        poll = self.poll.poll
        try:
            while True:
                data = None
                while spin_until:  # poll first (see DEFAULT_SPIN)
                    if poll(0):
                        try:
                            data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            raise ManagerUnavailable(f"lost the connection to the Manager: {exc}") from exc
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
                if data is None:
                    if own_timeout and not timeout_set:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
                        timeout_set = True
                    try:
                        data = sock.recv(_RECV_SIZE)
                    except (BlockingIOError, socket.timeout) as exc:  # SO_RCVTIMEO expired
                        raise ManagerUnavailable(f"no reply from the Manager within {timeout or 'no limit'}s") from exc
                    except OSError as exc:
                        raise ManagerUnavailable(f"lost the connection to the Manager: {exc}") from exc
                if not data:
                    raise ManagerUnavailable("the Manager closed the connection")
                for op, frid, payload in reader.feed(data):
                    if op == P.PUSH_QUEUED and frid == rid:
                        spin_until = 0.0  # a lock wait that will take a while: sleep, do not poll
                        queued = True
                        continue
                    if op >= P.PUSH_MIN:
                        continue  # pushes are consumed by the modules that subscribe to them
                    if frid != rid:
                        raise ProtocolError(f"reply for request {frid} while waiting for {rid}")
                    if not learn:
                        self.lock_poll = not queued
                    return op, payload
        finally:
            if timeout_set:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
                except OSError:
                    pass  # the connection is broken: the caller drops it

    def close(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()

    # A thread's connection goes when its thread-local storage goes.
    __del__ = close


class SocketClient(Client):
    """A client of a Manager at ``address``; one lazy connection per thread."""

    def __init__(self, address: str, secret: bytes, *, timeout: float = DEFAULT_TIMEOUT, spin: float = DEFAULT_SPIN) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.spin = spin
        self._local = threading.local()
        self._limits: Limits | None = None
        self._near: dict = {}  # ns -> NearCache
        self._tracker = None
        _socket_clients.add(self)

    def __repr__(self) -> str:
        return f"<SocketClient {self.address}>"

    @property
    def limits(self) -> Limits:  # type: ignore[override]
        if self._limits is None:
            self._connection()
        return self._limits  # type: ignore[return-value]

    # -- near caches (django_clustershm.near) ------------------------------------------

    def enable_near_cache(self, ns: str = "", max_entries: int = 10_000, max_bytes: int = 16 * 2**20):
        """Answer reads of namespace ``ns`` from a consistent worker-local copy."""
        near = self._near.get(ns)
        if near is None:
            from .near import Tracker

            if self._tracker is None:
                self._tracker = Tracker(self)
            near = self._near[ns] = self._tracker.near_cache(ns, max_entries, max_bytes)
        return near

    def get(self, key: str, default: Any = None, *, ns: str = "") -> Any:
        near = self._near.get(ns)
        if near is None:
            return super().get(key, default, ns=ns)
        data = near.get(self._key(key))
        return default if data is None else decode_value(data)

    def get_many(self, keys: Iterable[str], *, ns: str = "") -> dict:
        near = self._near.get(ns)
        if near is None:
            return super().get_many(keys, ns=ns)
        found = near.get_many([self._key(k) for k in keys])
        return {key: decode_value(data) for key, data in found.items()}

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Connection(self.address, self.secret, self.timeout, self.spin)
            self._local.conn = conn
            self._limits = conn.limits
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _call(self, op: int, args: list, reply_timeout=None):
        conn = self._connection()
        conn.rid = rid = (conn.rid + 1) & 0xFFFFFFFF or 1
        try:
            frame = P.encode(op, rid, args)
        except UnicodeEncodeError as exc:
            raise InvalidKey(f"a key cannot be encoded as UTF-8: {exc}") from exc
        if len(frame) - P.HEADER_SIZE > conn.limits.max_frame:
            raise ValueTooLarge(f"request of {len(frame)} bytes exceeds the maximum frame of {conn.limits.max_frame}; send fewer items at once")
        try:
            conn.send(frame)
        except OSError as exc:
            self._drop(conn)
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise ManagerUnavailable(f"cannot send to the Manager: {exc}") from exc
            # The Manager closed this connection before reading the request
            # (it restarted): nothing was applied, so sending again is safe.
            conn = self._connection()
            conn.rid = rid
            try:
                conn.send(frame)
            except OSError as exc2:
                self._drop(conn)
                raise ManagerUnavailable(f"cannot send to the Manager: {exc2}") from exc2
        try:
            op, payload = conn.receive(rid, reply_timeout)
        except BaseException:
            # A timeout, a lost Manager, or an interruption (KeyboardInterrupt,
            # gunicorn's worker abort) while a reply may still come: the
            # stream's state is unknown, so the connection goes. The Manager
            # then drops whatever this connection held or waited for.
            self._drop(conn)
            raise
        result = P.decode_payload(payload)
        if op == P.OK:
            return result
        if op == P.ERR:
            raise error_from_code(result[0], result[1])
        self._drop(conn)
        raise ProtocolError(f"unexpected reply opcode 0x{op:02x}")

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._drop(conn)

    def _after_fork_in_child(self) -> None:
        self._local = threading.local()


def _after_fork_in_child() -> None:
    # Close the child's copies of every connection the parent had (in any
    # thread), then give each client empty thread-local state.
    for conn in list(_live_connections):
        conn.close()
    for client in list(_socket_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- embedded ------------------------------------------------------------------------

_embedded_clients: "weakref.WeakSet[EmbeddedClient]" = weakref.WeakSet()


class _ThreadSession:
    """One thread's session on an embedded engine (the counterpart of one
    connection per thread): when the thread ends, this object is collected
    and its session closed, which releases the locks the thread held."""

    __slots__ = ("session", "rid", "replies", "dead")

    def __init__(self, engine: Engine, dead: list) -> None:
        self.session = engine.open_session(pid=os.getpid())
        self.rid = 0
        self.replies: dict[int, Any] = {}
        # Called under the client's mutex, which is then notified. The dict's
        # own method, not one of ours: no reference cycle, so this object is
        # freed (and its session closed) as soon as its thread ends.
        self.session.deliver = self.replies.__setitem__
        self.dead = dead

    def __del__(self) -> None:
        # Not closed here: this may run anywhere, even inside the engine.
        self.dead.append(self.session)


class EmbeddedClient(Client):
    """The API on an in-process engine: for runserver, shells and test suites.

    Each thread has a session of its own, as each has a connection of its
    own in a cluster, so locks behave the same (a lock is its holder
    thread's, and is released when that thread ends). A waiting thread waits
    on a condition without holding the engine's mutex, and moves the engine's
    clock along (lease and wait expiry) every few milliseconds.

    State lives in this process only. A process forked from this one gets its
    own copy, which is not shared: that is logged once in the child, since it
    usually means a prefork server runs without ``runcluster``.
    """

    #: How often a waiting thread checks leases, deadlines and dead threads.
    wait_slice = 0.005

    def __init__(self, engine: Engine | None = None, **engine_options) -> None:
        self.engine = engine or Engine(**engine_options)
        self.limits = self.engine.limits
        self._cond = threading.Condition(threading.Lock())
        self._local = threading.local()
        self._dead: list = []
        self._forked = False
        self.retired = False
        _embedded_clients.add(self)

    def __repr__(self) -> str:
        return "<EmbeddedClient>"

    def _thread_session(self) -> _ThreadSession:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadSession(self.engine, self._dead)
        return state

    def _housekeeping(self) -> None:
        if self.retired:
            raise ManagerUnavailable("this embedded Manager was handed over to the cluster's Manager")
        engine = self.engine
        dead = self._dead
        while dead:
            engine.close_session(dead.pop())
        engine.tick()

    def _call(self, op: int, args: list, reply_timeout=None):
        if self._forked:
            self._forked = False
            logger.warning(
                "django-clustershm: process %d uses an embedded Manager inherited through fork(); its state "
                "is a private copy, not shared with other processes. Serve with 'manage.py runcluster' "
                "(or the gunicorn config module) to share state between workers.",
                os.getpid(),
            )
        with self._cond:
            self._housekeeping()  # raises if the engine was handed over
            # Made under the mutex: opening a session changes the engine.
            state = self._thread_session()
            state.rid += 1
            rid = state.rid
            result = self.engine.dispatch(state.session, op, args, rid)
            if result is not DEFERRED:
                if state.replies:
                    self._cond.notify_all()
                return result
            replies = state.replies
            while rid not in replies:
                self._cond.wait(self.wait_slice)
                self._housekeeping()
                self._cond.notify_all()
            return replies.pop(rid)

    def retire(self) -> Engine:
        """Hand the engine over (to a Manager that will serve it): close every
        session of this client, and refuse calls from now on."""
        with self._cond:
            self.retired = True
            for session in list(self.engine.sessions.values()):
                self.engine.close_session(session)
            self._dead.clear()
            self._cond.notify_all()
        return self.engine

    def close(self) -> None:
        """Close this thread's session: whatever locks it held are released."""
        state = getattr(self._local, "state", None)
        if state is not None and not self.retired:
            self._local.state = None
            with self._cond:
                self.engine.close_session(state.session)
                self._cond.notify_all()


def _after_fork_embedded() -> None:
    for client in list(_embedded_clients):
        client._cond = threading.Condition(threading.Lock())  # the parent may have held it mid-fork
        client._forked = True


os.register_at_fork(after_in_child=_after_fork_embedded)
