"""Listeners on the Redis engine: a :class:`~..client.transport.Channel` made of pub/sub connections (#16).

The listener dispatcher (:mod:`..client.dispatcher`) is the same as on the
local engine; only its channel differs. Where the events come from:

* **Writes** (set, add, replace, incr, set_many: ``set`` with the value;
  remove, delete_many, scan_delete, touch/replace with ttl <= 0: ``remove``;
  clear: ``clear``; MAX_ENTRIES culling: ``evict``): the write scripts of
  :mod:`.scripts` publish them, in the same atomic step as the write, on the
  namespace's sharded channel ``{P|ns}#e`` (SPUBLISH: on a Cluster the
  channel lives on the namespace's shard), but only while the namespace's
  presence key ``{P|ns}#l`` exists. Every listening process sets that key
  (PX 15 s) and renews it every 5 s from its dispatcher thread; a process
  that could not renew it in time (a callback blocked the thread for 15 s)
  may have missed events, so it resynchronises (``on_resync``).
* **Expirations and evictions by the server** (``expire``, ``evict``): the
  server's keyspace notifications ``__keyevent@<db>__:expired`` and
  ``:evicted``, which the channel turns on at open (``CONFIG SET
  notify-keyspace-events``, merged with what is set). A server that refuses
  CONFIG (a managed Redis) then says nothing about keys that expire: one
  warning says so, and writes still publish theirs. Keyspace notifications
  are not sharded: on a Cluster the channel subscribes on every primary (a
  primary added or promoted later is heard from after the next reconnection).

What a listener sees (tested in ``tests/test_redis_listen.py``):

* Events of a key arrive in the order of its writes (one server, one
  connection per shard, published inside the write's script).
* At most once: a lost pub/sub connection loses the events of the gap; the
  dispatcher subscribes again and calls ``on_resync``. After a Sentinel
  failover, within one renewal (5 s): a demoted primary may keep its pub/sub
  clients, so each renewal checks that the connection is to the primary.
* The writing process's own listeners have run when its write returns: the
  dispatcher's barrier is a PING on each pub/sub connection, and Redis puts
  a published message in every subscriber's output buffer during the
  publishing command, so the PONG of a PING sent after the write returned
  comes after the write's event.
* Other processes hear within the push delay, not before the writer returns
  (pub/sub has no acknowledgement; strict listeners are part 3 of #16).
* A value is checked as a read checks it (:mod:`.values`): one whose
  signature is bad is logged and its event delivered with value None (the
  event is true, the value is not trusted). A set of a value over 64 KiB is
  published without it, and the listener reads the key (GET): it may then
  see a later value, or None if the key is gone.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any

import msgpack

from ..client.transport import Channel, Message
from ..exceptions import BadSignature, ManagerUnavailable, Unsupported
from ..wire import frames as F
from .errors import translate
from .scripts import ack_key

#: The most pub/sub messages one receive() reads from a connection.
DRAIN_BATCH = 1024

logger = logging.getLogger("django_clustershm.listen")

#: How long a namespace's presence key lives without renewal (ms), and how often it is renewed (s).
PRESENCE_TTL_MS = 15_000
RENEW_EVERY = PRESENCE_TTL_MS / 1000 / 3
#: The keyspace-notification classes this channel needs: E (keyevent), x (expired), e (evicted).
NOTIFY_FLAGS = "Exe"

NOT_NEAR = "a listener channel of the Redis engine carries listeners only (the near cache is refused before)"


class _Node:
    """One pub/sub connection: to the server (standalone, Sentinel's primary) or to one Cluster primary."""

    __slots__ = ("conn", "data", "name", "pings", "pool")

    def __init__(self, name: str, data, pool, conn) -> None:
        self.name = name
        self.data = data  # a redis-py client of that node (CONFIG)
        self.pool = pool
        self.conn = conn
        self.pings: deque[_Barrier] = deque()  # PINGs sent, in order: their PONGs come back in order

    def fileno(self) -> int:
        sock = self.conn._sock
        if sock is None:
            raise ManagerUnavailable(f"the listener connection to {self.name} was closed")
        return sock.fileno()


def _as_is(message):
    return message


class _Barrier:
    __slots__ = ("left", "rid")

    def __init__(self, rid: int, left: int) -> None:
        self.rid = rid
        self.left = left


class _Space:
    """A namespace this channel listens to: its channel, key prefix, node, subscribers."""

    __slots__ = ("channel", "confirmed", "listening_key", "node", "pfx", "sessions_key", "subs", "waiting")

    def __init__(self, ns_keys: tuple, node: _Node) -> None:
        pfx, _index, _deadlines, listening_key = ns_keys
        self.pfx = pfx
        self.listening_key = listening_key
        self.channel = listening_key[:-2] + b"#e"
        self.sessions_key = listening_key[:-2] + b"#L"  # STRICT_LISTENERS: the listening sessions
        self.node = node
        self.confirmed = False
        self.waiting: list[int] = []  # LISTEN request ids answered when the subscription is confirmed
        self.subs: dict[int, tuple[str, bool]] = {}  # sub_id -> (key, prefix)


class RedisEventChannel(Channel):
    """The listener channel of one process on the Redis engine (see the module's docstring)."""

    def __init__(self, transport: Any) -> None:  # a RedisTransport (whose module imports this one)
        super().__init__()
        self.transport = transport
        self.codec = transport.codec
        self._mutex = threading.Lock()  # wake() against close(): never write to a reused fd
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._out: list[Message] = []
        self._nodes: dict[str, _Node] = {}
        self._spaces: dict[str, _Space] = {}  # ns -> its state
        self._by_channel: dict[bytes, str] = {}
        self._unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent and not yet confirmed
        self._subs: dict[int, str] = {}  # sub_id -> ns
        self._renewed = time.monotonic()
        #: STRICT_LISTENERS: this process's listener session (writers wait for its
        #: acknowledgement, sent once the callbacks of their events ran), its lease
        #: renewed every third of STRICT_LEASE; the acks owed for what receive() returned.
        config = transport.config
        self.lsid: bytes | None = os.urandom(8).hex().encode() if config.strict_listeners else None
        self._lease_ms = str(int(config.strict_lease * 1000))
        self._lease_every = config.strict_lease / 3
        self._lrenewed = time.monotonic()
        self._owed_acks: list[bytes] = []
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> None:

        try:
            r = self.transport.redis
            if self.transport.config.kind == "cluster":
                # The slot map as it is now: a channel is (re)opened after a lost
                # one, and a resharding (a slot moved) is one way to lose it.
                r.nodes_manager.initialize()
                for node in r.get_primaries():
                    self._open_node(node.name, r.get_redis_connection(node))
            else:
                self._open_node("server", r)
        except ManagerUnavailable:
            raise
        except Exception as exc:
            raise translate(exc, self.transport.where) from exc

    def _open_node(self, name: str, data) -> _Node:
        pool = data.connection_pool
        conn = pool.get_connection()
        # RESP3 (redis-py 8's default) delivers pub/sub messages as pushes: have
        # the parser hand them back as they are (RESP2 gives plain arrays).
        conn._parser.set_pubsub_push_handler(_as_is)
        node = self._nodes[name] = _Node(name, data, pool, conn)
        db = getattr(conn, "db", 0) or 0
        self._enable_notifications(data)
        conn.send_command("SUBSCRIBE", f"__keyevent@{db}__:expired", f"__keyevent@{db}__:evicted")
        return node

    def _enable_notifications(self, data) -> None:
        """Turn on the expired/evicted keyevent notifications, keeping what is set."""
        import redis.exceptions as E

        try:
            found = data.execute_command("CONFIG", "GET", "notify-keyspace-events")
            if isinstance(found, dict):
                current = next(iter(found.values()), b"")
            else:
                current = found[1] if found else b""
            current = current.decode() if isinstance(current, bytes) else str(current)
            missing = [c for c in NOTIFY_FLAGS if c not in current and not (c in "xe" and "A" in current)]
            if missing:
                data.execute_command("CONFIG", "SET", "notify-keyspace-events", current + "".join(missing))
        except E.ResponseError as exc:
            transport = self.transport
            if not getattr(transport, "notify_refused", False):
                transport.notify_refused = True
                logger.warning(
                    "the Redis engine at %s refused to turn on keyspace notifications (%s): listeners hear no "
                    "'expire' or 'evict' event for keys the server expires or evicts itself, only the events of "
                    "writes; set notify-keyspace-events to include 'Exe' on the server to have them",
                    transport.where,
                    exc,
                )

    def _node_for(self, channel: bytes) -> _Node:
        if self.transport.config.kind != "cluster":
            return self._nodes["server"]
        r = self.transport.redis
        node = r.get_node_from_key(channel)
        found = self._nodes.get(node.name)
        if found is None:  # a primary this channel did not know at open
            found = self._open_node(node.name, r.get_redis_connection(node))
        return found

    # -- requests from the dispatcher ---------------------------------------------------------

    def send(self, op: int, rid: int, args: list) -> None:
        try:
            if op == F.LISTEN:
                self._listen(rid, *args)
            elif op == F.UNLISTEN:
                self._unlisten(rid, args[0])
            elif op == F.PING:
                barrier = _Barrier(rid, len(self._nodes))
                for node in self._nodes.values():
                    node.conn.send_command("PING")
                    node.pings.append(barrier)
            else:
                self._out.append((F.ERR, rid, [Unsupported.code, NOT_NEAR]))
        except ManagerUnavailable:
            raise
        except Exception as exc:
            raise self._lost(exc) from exc

    def post(self, op: int, args: list) -> None:
        """Hints (a near cache's) have nowhere to go here."""

    def _listen(self, rid: int, sub_id: int, ns: str, key: str, prefix: bool) -> None:
        space = self._spaces.get(ns)
        if space is None:
            keys = self.transport.ops.space(ns)
            # Present before subscribed: a write after listen() returns publishes.
            self.transport.redis.set(keys[3], b"1", px=PRESENCE_TTL_MS)
            if not self._spaces:
                self._renewed = time.monotonic()  # the others' keys are renewed from here on
            node = self._node_for(keys[3][:-2] + b"#e")
            space = self._spaces[ns] = _Space(keys, node)
            self._by_channel[space.channel] = ns
            node.conn.send_command("SSUBSCRIBE", space.channel)
        space.subs[sub_id] = (key, prefix)
        self._subs[sub_id] = ns
        if space.confirmed:
            self._out.append((F.OK, rid, True))
        else:
            space.waiting.append(rid)

    def _unlisten(self, rid: int, sub_id: int) -> None:
        ns = self._subs.pop(sub_id, None)
        space = self._spaces.get(ns) if ns is not None else None
        if space is not None:
            space.subs.pop(sub_id, None)
            if not space.subs and not space.waiting:
                del self._spaces[ns]  # type: ignore[arg-type]
                self._by_channel.pop(space.channel, None)
                self._unsubscribing[space.channel] = self._unsubscribing.get(space.channel, 0) + 1
                space.node.conn.send_command("SUNSUBSCRIBE", space.channel)
                if self.lsid is not None:  # writers need not wait for this process's lease
                    self.transport.redis.execute_command("ZREM", space.sessions_key, self.lsid)
        self._out.append((F.OK, rid, ns is not None))

    # -- what arrives --------------------------------------------------------------------------

    def receive(self, timeout: float | None) -> list[Message]:
        """What arrived; first, the acknowledgements of the strict writes whose
        events the previous receive() returned: the dispatcher asks again only
        once it ran their callbacks."""
        if self._owed_acks:
            owed, self._owed_acks = self._owed_acks, []
            script = self.transport.ops.script("NEAR_ACK")
            try:
                for key in owed:
                    self.transport.eval(self.transport.redis, script, [key], [self.lsid])
            except Exception as exc:
                raise self._lost(exc) from exc
        return super().receive(timeout)

    def _receive(self, timeout: float | None) -> list[Message]:
        out = self._drain()
        if out or timeout == 0:
            return out
        wait = RENEW_EVERY if timeout is None else timeout
        if self._spaces:
            wait = min(wait, max(0.0, self._renewed + RENEW_EVERY - time.monotonic()))
            if self.lsid is not None:
                wait = min(wait, max(0.0, self._lrenewed + self._lease_every - time.monotonic()))
        fds = [node.fileno() for node in self._nodes.values()]
        try:
            readable, _, _ = select.select([*fds, self._wake_r], [], [], wait)
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from exc
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return self._drain()

    def _drain(self) -> list[Message]:
        """Everything that can be read now, without waiting."""
        self._renew()
        try:
            for node in list(self._nodes.values()):
                conn = node.conn
                # At most a batch a call: a flood of events is dispatched as it
                # comes, not first gathered here (what waits stays in the socket,
                # and past Redis's pub/sub output limit the server cuts us off,
                # which resubscribes and calls on_resync).
                for _ in range(DRAIN_BATCH):
                    if conn._sock is None:  # can_read() would reconnect: subscriptions lost
                        raise ManagerUnavailable(f"the listener connection to {node.name} was closed")
                    if not conn.can_read(0):
                        break
                    self._handle(node, conn.read_response(push_request=True))
        except ManagerUnavailable:
            raise
        except Exception as exc:
            raise self._lost(exc) from exc
        out, self._out = self._out, []
        return out

    def _renew_sessions(self, spaces) -> None:
        """STRICT_LISTENERS: (re)new this process's session in each namespace's {P|ns}#L."""
        script = self.transport.ops.script("NEAR_RENEW")
        r = self.transport.redis
        for space in spaces:
            self.transport.eval(r, script, [space.sessions_key], [self.lsid, self._lease_ms])

    def _renew(self) -> None:
        now = time.monotonic()
        if self.lsid is not None and self._spaces and now >= self._lrenewed + self._lease_every:
            try:
                self._renew_sessions([space for space in self._spaces.values() if space.confirmed])
            except Exception as exc:
                raise self._lost(exc) from exc
            self._lrenewed = now
        if not self._spaces or now < self._renewed + RENEW_EVERY:
            return
        gap = now - self._renewed
        late = gap > PRESENCE_TTL_MS / 1000 - 1
        r = self.transport.redis
        try:
            for space in self._spaces.values():
                r.set(space.listening_key, b"1", px=PRESENCE_TTL_MS)
            if self.transport.config.kind == "sentinel":
                # A demoted primary need not close its pub/sub clients: check, at
                # each renewal, that this connection is still to the primary.
                conn = self._nodes["server"].conn
                primary = r.connection_pool.get_master_address()
                if primary is not None and tuple(primary) != (conn.host, conn.port):
                    raise ManagerUnavailable(
                        f"the primary moved to {primary[0]}:{primary[1]} (failover): listening there now"
                    )
        except ManagerUnavailable:
            raise
        except Exception as exc:
            raise self._lost(exc) from exc
        self._renewed = now
        if late:
            # The presence keys may have lapsed meanwhile: writes then published nothing.
            raise ManagerUnavailable(
                f"the listeners of process {os.getpid()} did not renew their presence for "
                f"{gap:.1f}s (a callback held the dispatcher thread?): events may have been missed"
            )

    def _handle(self, node: _Node, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            if reply in (b"PONG", "PONG"):
                self._pong(node)
            return
        kind = reply[0]
        if kind == b"smessage":
            ns = self._by_channel.get(reply[1])
            if ns is not None:
                self._event(ns, reply[2])
        elif kind == b"message":
            self._keyevent(reply[1], reply[2])
        elif kind == b"pong":
            self._pong(node)
        elif kind == b"ssubscribe":
            ns = self._by_channel.get(reply[1])
            space = self._spaces.get(ns) if ns is not None else None
            if space is not None and not space.confirmed:
                if self.lsid is not None:  # in the session set before listen() returns
                    self._renew_sessions([space])
                space.confirmed = True
                for rid in space.waiting:
                    self._out.append((F.OK, rid, True))
                space.waiting = []
        elif kind == b"sunsubscribe":
            channel = reply[1]
            pending = self._unsubscribing.get(channel, 0)
            if pending:
                if pending == 1:
                    del self._unsubscribing[channel]
                else:
                    self._unsubscribing[channel] = pending - 1
            elif channel in self._by_channel:
                # Not asked for: the server dropped it (its slot moved to another shard).
                raise ManagerUnavailable(f"the server dropped the listener subscription {channel!r} (slot moved?)")

    def _pong(self, node: _Node) -> None:
        if not node.pings:
            return
        barrier = node.pings.popleft()
        barrier.left -= 1
        if barrier.left == 0:
            self._out.append((F.OK, barrier.rid, "pong"))

    def _event(self, ns: str, payload: bytes) -> None:
        try:
            event = msgpack.unpackb(payload, raw=True)
            code = event[0]
            member = event[1] if len(event) > 1 else None
            raw = event[2] if len(event) > 2 else None
        except Exception:
            logger.warning("a listener event of namespace %r is not one of ours (%r...): skipped", ns, payload[:40])
            return
        space = self._spaces[ns]
        if code == 0:  # the end of a strict write's events: acknowledged once they are dispatched
            if self.lsid is not None and len(event) > 3:
                self._owed_acks.append(ack_key(space.listening_key, event[3]))
            return
        if code == F.EVENT_CLEAR:
            for sub_id in space.subs:
                self._out.append((F.PUSH_EVENT, 0, [sub_id, ns, None, code, None]))
            return
        if not isinstance(member, bytes) or type(code) is not int:
            logger.warning("a listener event of namespace %r is malformed: skipped", ns)
            return
        rkey = space.pfx + member
        value = None
        if code == F.EVENT_SET:
            if raw is None:  # over 64 KiB: not in the event
                raw = self.transport.redis.get(rkey)
            value = self._decode(rkey, raw)
        self._deliver(space, ns, member, code, value)

    def _keyevent(self, channel: bytes, rkey: bytes) -> None:
        if channel.endswith(b":expired"):
            code = F.EVENT_EXPIRE
        elif channel.endswith(b":evicted"):
            code = F.EVENT_EVICT
        else:
            return
        best: tuple[str, _Space] | None = None
        for ns, space in self._spaces.items():
            if rkey.startswith(space.pfx) and (best is None or len(space.pfx) > len(best[1].pfx)):
                best = (ns, space)
        if best is not None:
            self._deliver(best[1], best[0], rkey[len(best[1].pfx) :], code, None)

    def _deliver(self, space: _Space, ns: str, member: bytes, code: int, value) -> None:
        try:
            key = member.decode("utf-8")
        except UnicodeDecodeError:
            return  # not a key this library wrote
        for sub_id, (target, prefix) in space.subs.items():
            if key.startswith(target) if prefix else key == target:
                self._out.append((F.PUSH_EVENT, 0, [sub_id, ns, key, code, value]))

    def _decode(self, rkey: bytes, raw):
        try:
            return self.codec.decode(rkey, raw)
        except BadSignature as exc:
            logger.warning("listener event: %s; delivered with value None", exc)
            return None

    # -- the rest of the Channel interface ------------------------------------------------------

    def ready(self) -> bool:
        if self._out or self._backlog:
            return True
        try:
            return any(node.conn._sock is None or node.conn.can_read(0) for node in self._nodes.values())
        except Exception:
            return True  # receive() will say what is wrong

    def wake(self) -> None:
        with self._mutex:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # full (already woken), or closing
                pass

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self.lsid is not None:
            try:  # the session leaves at once: writers need not wait for its lease
                for space in self._spaces.values():
                    self.transport.redis.execute_command("ZREM", space.sessions_key, self.lsid)
            except Exception:
                logger.debug("a strict listener session could not leave", exc_info=True)
        for node in self._nodes.values():
            try:
                node.conn.disconnect()
                node.pool.release(node.conn)
            except Exception:
                logger.debug("closing a listener connection failed", exc_info=True)
        self._nodes = {}

    def forget(self) -> None:
        """In a forked child: drop the parent's connections without touching them (no SHUT_RDWR)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        for node in self._nodes.values():
            sock, node.conn._sock = node.conn._sock, None
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._nodes = {}

    def _lost(self, exc: Exception) -> ManagerUnavailable:

        error = translate(exc, self.transport.where)
        if isinstance(error, ManagerUnavailable):
            return error
        return ManagerUnavailable(f"the listener channel to {self.transport.where} failed: {error}")
