"""Every request of the wire protocol, carried out on Redis: written once, run sync or async.

Each operation is a generator (a *plan*, sans-IO in the manner of h11): it
yields what it needs done on Redis, gets the reply sent back in, and returns
the operation's result, shaped exactly as the Manager answers it (see
:mod:`..wire.frames`). The sync transport runs a plan with redis-py's
blocking client; the asyncio one awaits each step on ``redis.asyncio``.
Nothing here does I/O, so the two cannot drift apart.

What a plan yields:

* ``(CMD, args)``: one command (``("GET", key)``...);
* ``(SCRIPT, script, keys, argv)``: one of :mod:`.scripts`, by EVALSHA;
* ``(BLOCK, key, seconds)``: a BLPOP on a waiter's mailbox (a lock wait);
* ``(HOLD, key, token, lease_ms, keep, now)``: hand a granted lock to the
  process's watchdog (:class:`.watchdog.Watchdog`): ``keep`` renews it while
  its holder lives (a lock without a lease), ``now`` extends it at once (a
  lock handed over with a first lease of one heartbeat);
* ``(DROP, token)``: tell the watchdog a lock is no longer held;
* ``(KEYSCAN, pattern)``: every key matching, on every primary (SCAN: stats only);
* ``(SLEEP, seconds)``: wait here (the last stretch of a holder's lease, see lock_acquire).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

from ..client.transport import LOCAL_CAPABILITIES
from ..exceptions import InvalidArgument, LockNotOwned, Unsupported
from ..wire import frames as F
from ..wire.limits import DEFAULT_BOUNDS
from . import scripts as S
from .config import EngineConfig
from .values import Codec

#: What the near cache guarantees on this engine (the .near module says how).
NEAR_CONSISTENCY = (
    "eventual: read-your-writes in the process; another process's write reaches this process's copies within "
    "the push delay (not before the writer's call returns); a lost tracking connection empties the near cache"
)
NEAR_STRICT = (
    "strict: never older than a completed write, in any process: a write returns once every live process holding "
    "the key dropped its copy (a hung one holds a writer up at most STRICT_LEASE={lease:g}s, and serves no copy after)"
)

CMD, SCRIPT, BLOCK, HOLD, DROP, KEYSCAN, SLEEP = range(7)

LISTEN_ON_CHANNEL = "LISTEN and UNLISTEN travel on a listener channel (RedisTransport.open_channel), not as calls"
TRACK_ON_CONNECTION = (
    "TRACKER and TRACK_GET travel on the near cache's tracking connection (redisengine.near), not as calls"
)


class Script:
    """A Lua script and its SHA1 (EVALSHA first; EVAL once if the server lost it)."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SCRIPTS = {
    name: Script(name, getattr(S, name))
    for name in (
        "SET",
        "ADD",
        "REPLACE",
        "REMOVE",
        "DELETE_MANY",
        "SET_MANY",
        "INCR",
        "TOUCH",
        "PERSIST",
        "KEYS",
        "CLEAR",
        "SCAN",
        "COUNT",
        "LOCK_ACQUIRE",
        "LOCK_RELEASE",
        "LOCK_CANCEL",
        "LOCK_EXTEND",
        "NEAR_READ",
        "NEAR_RENEW",
        "NEAR_ACK",
    )
}
_S = _SCRIPTS


#: How late Redis may end a blocked command (1/hz at the default hz 10).
_HZ_SLACK = 0.1


def _ms(seconds) -> str:
    """A ttl or lease in whole milliseconds for a script ('' for None; '0' for
    zero or less, which the scripts treat as "expired at once")."""
    if seconds is None:
        return ""
    if seconds <= 0:
        return "0"
    return str(max(1, math.ceil(seconds * 1000)))


def _members(keys: list) -> list[str]:
    return [m.decode("utf-8") if type(m) is bytes else m for m in keys]


class Capabilities:
    """What an engine guarantees, said out loud (runcluster's start-up log, stats(), the README)."""

    LOCAL = LOCAL_CAPABILITIES

    @staticmethod
    def redis(config: EngineConfig) -> dict[str, Any]:
        return {
            "engine": f"redis ({config.kind})",
            "shared_across_hosts": True,
            "lock_freed_when_holder_dies": (
                f"within one lease (LOCK_LEASE={config.lock_lease:g}s, renewed every third of it while the "
                "holder lives); at once when it releases or exits cleanly"
            ),
            "lock_fifo": (
                f"True for live waiters; a dead waiter delays the others at most LOCK_HEARTBEAT="
                f"{config.lock_heartbeat:g}s"
            ),
            "lock_fencing": "strictly increasing per key (a failover that loses a write can break this)",
            "lock_wait_deadline": "decided by the Redis server's clock",
            "listeners": (
                "strict: a write returns once every live listening process ran its callbacks for it (a hung one "
                f"holds a writer up at most STRICT_LEASE={config.strict_lease:g}s); per-key order kept; on_resync "
                "after every reconnection"
                if config.strict_listeners
                else "eventual: at most once, per-key order kept; the writing process's own listeners have run when "
                "its call returns; other processes hear within the push delay (not before the writer returns); "
                "on_resync after every reconnection"
            ),
            "near_cache": NEAR_CONSISTENCY,
            "near_cache_strict": NEAR_STRICT.format(lease=config.strict_lease),
            "multi_key_atomic": (
                "set_many, delete_many: one step (one hash slot per namespace); clear: in steps of 1,000 keys"
            ),
            "cache_cull": "MAX_ENTRIES/CULL_FREQUENCY culled in key order (as Django's DatabaseCache); "
            "no MAX_BYTES (Redis's maxmemory bounds the bytes)",
            "durability": "as the Redis server's (replication is asynchronous: a failover may lose recent writes)",
            "values_signed": config.sign_values,
        }


class RedisOps:
    """The plans of every request, on one engine configuration."""

    def __init__(self, config: EngineConfig, codec: Codec, timeout: float) -> None:
        #: This process's round trips so far (the transport counts them): stats()["ops"].
        self.ops_count: Callable[[], int] = lambda: 0
        self.config = config
        self.codec = codec
        self.timeout = timeout
        prefix = config.prefix
        self._prefix = prefix
        self._tags: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}
        self._heartbeat_ms = str(math.ceil(config.lock_heartbeat * 1000))
        self._lease_ms = math.ceil(config.lock_lease * 1000)
        self.capabilities = Capabilities.redis(config)
        self.plans: dict[int, Callable[..., Any]] = {
            F.PING: self.ping,
            F.GET: self.get,
            F.SET: self.set,
            F.ADD: self.add,
            F.REMOVE: self.remove,
            F.HAS: self.has,
            F.INCR: self.incr,
            F.TOUCH: self.touch,
            F.GET_MANY: self.get_many,
            F.SET_MANY: self.set_many,
            F.DELETE_MANY: self.delete_many,
            F.KEYS: self.keys,
            F.CLEAR: self.clear,
            F.STATS: self.stats,
            F.LOCK_ACQUIRE: self.lock_acquire,
            F.LOCK_RELEASE: self.lock_release,
            F.LOCK_EXTEND: self.lock_extend,
            F.LOCK_STATUS: self.lock_status,
            F.TTL: self.ttl,
            F.PERSIST: self.persist,
            F.REPLACE: self.replace,
            F.KEYS_MATCH: self.keys_match,
            F.SCAN: self.scan,
            F.SCAN_DELETE: self.scan_delete,
            F.LISTEN: self._no_listen,
            F.UNLISTEN: self._no_listen,
            F.TRACKER: self._no_near,
            F.TRACK_GET: self._no_near,
            F.TRACK_GET_MANY: self._no_near,
        }

    @staticmethod
    def script(name: str) -> Script:
        return _SCRIPTS[name]

    def plan(self, op: int, args: list):
        handler = self.plans.get(op)
        if handler is None:
            raise InvalidArgument(f"unknown opcode 0x{op:02x}")
        return handler(*args)

    # -- keys -----------------------------------------------------------------------------

    def space(self, ns: str) -> tuple[bytes, bytes, bytes, bytes]:
        """(value-key prefix, index key, deadlines key, listeners' presence key)
        of namespace ``ns``: one hash tag, one slot (see .scripts)."""
        found = self._tags.get(ns)
        if found is None:
            tag = ("{" + self._prefix + "|" + ns + "}").encode("utf-8")
            found = self._tags[ns] = (tag + b":", tag + b"#i", tag + b"#x", tag + b"#l")
        return found

    def _bounds(self, ns: str, bounds) -> tuple[str, str]:
        if ns == "":
            return "", ""
        if bounds is None:
            bounds = DEFAULT_BOUNDS
        return str(int(bounds[0])), str(int(bounds[1]))

    # -- the store and the caches -------------------------------------------------------------

    def ping(self):
        yield CMD, ("PING",)
        return "pong"

    def get(self, ns, key):
        rkey = self.space(ns)[0] + key.encode("utf-8")
        raw = yield CMD, ("GET", rkey)
        return self.codec.decode(rkey, raw)

    def has(self, ns, key):
        found = yield CMD, ("EXISTS", self.space(ns)[0] + key.encode("utf-8"))
        return bool(found)

    def _write(self, script: Script, ns, key, value, ttl, bounds, extra=False):
        pfx, index, deadlines, listening = self.space(ns)
        member = key.encode("utf-8")
        rkey = pfx + member
        max_entries, cull = self._bounds(ns, bounds)
        argv = [pfx, member, self.codec.encode(rkey, value), _ms(ttl)]
        if extra:
            argv += [max_entries, cull]
        result = yield SCRIPT, script, (rkey, index, deadlines, listening), argv
        return result

    def set(self, ns, key, value, ttl, bounds=None):
        if ttl is not None and ttl <= 0:
            yield from self.remove(ns, key)
            return None
        yield from self._write(_S["SET"], ns, key, value, ttl, bounds, True)
        return None

    def add(self, ns, key, value, ttl, bounds=None):
        stored = yield from self._write(_S["ADD"], ns, key, value, ttl, bounds, True)
        return bool(stored)

    def replace(self, ns, key, value, ttl, bounds=None):
        stored = yield from self._write(_S["REPLACE"], ns, key, value, ttl, bounds)
        return bool(stored)

    def remove(self, ns, key):
        pfx, index, deadlines, listening = self.space(ns)
        member = key.encode("utf-8")
        found = yield SCRIPT, _S["REMOVE"], (pfx + member, index, deadlines, listening), [pfx, member]
        return bool(found)

    def incr(self, ns, key, delta, initial, bounds=None):
        pfx, index, deadlines, listening = self.space(ns)
        member = key.encode("utf-8")
        max_entries, cull = self._bounds(ns, bounds)
        argv = [pfx, member, str(delta), "" if initial is None else str(initial), max_entries, cull]
        result = yield SCRIPT, _S["INCR"], (pfx + member, index, deadlines, listening), argv
        return int(result)

    def touch(self, ns, key, ttl):
        pfx, index, deadlines, listening = self.space(ns)
        member = key.encode("utf-8")
        found = yield SCRIPT, _S["TOUCH"], (pfx + member, index, deadlines, listening), [pfx, member, _ms(ttl)]
        return bool(found)

    def persist(self, ns, key):
        pfx, index, deadlines, listening = self.space(ns)
        member = key.encode("utf-8")
        found = yield SCRIPT, _S["PERSIST"], (pfx + member, index, deadlines, listening), [pfx, member]
        return bool(found)

    def ttl(self, ns, key):
        left = yield CMD, ("PTTL", self.space(ns)[0] + key.encode("utf-8"))
        if left == -2 or left == 0:  # 0: under a millisecond left, expired for every purpose
            return [False, None]
        if left == -1:
            return [True, None]
        return [True, left / 1000]

    def get_many(self, ns, keys):
        if not keys:
            return {}
        pfx = self.space(ns)[0]
        rkeys = [pfx + key.encode("utf-8") for key in keys]
        raws = yield CMD, ("MGET", *rkeys)
        decode = self.codec.decode
        found = {}
        for key, rkey, raw in zip(keys, rkeys, raws, strict=True):
            if raw is not None:
                found[key] = decode(rkey, raw)
        return found

    def set_many(self, ns, items, ttl, bounds=None):
        if not items:
            return None
        pfx, index, deadlines, listening = self.space(ns)
        max_entries, cull = self._bounds(ns, bounds)
        argv: list = [pfx, _ms(ttl), max_entries, cull]
        encode = self.codec.encode
        for i in range(0, len(items), 2):
            member = items[i].encode("utf-8")
            argv.append(member)
            argv.append(encode(pfx + member, items[i + 1]))
        yield SCRIPT, _S["SET_MANY"], (index, deadlines, listening), argv
        return None

    def delete_many(self, ns, keys):
        if not keys:
            return 0
        pfx, index, deadlines, listening = self.space(ns)
        count = yield (
            SCRIPT,
            _S["DELETE_MANY"],
            (index, deadlines, listening),
            [pfx, *[k.encode("utf-8") for k in keys]],
        )
        return int(count)

    def keys(self, ns, prefix):
        pfx, index, deadlines, _listening = self.space(ns)
        found = yield SCRIPT, _S["KEYS"], (index, deadlines), [pfx, prefix.encode("utf-8")]
        return _members(found)

    def clear(self, ns):
        pfx, index, deadlines, listening = self.space(ns)
        total = 0
        while True:
            removed, more = yield SCRIPT, _S["CLEAR"], (index, deadlines, listening), [pfx]
            total += int(removed)
            if not more:
                return total

    def count(self, ns):
        pfx, index, deadlines, _listening = self.space(ns)
        found = yield SCRIPT, _S["COUNT"], (index, deadlines), [pfx]
        return int(found)

    def _scan_step(self, ns, cursor, pattern, count, delete: bool):
        pfx, index, deadlines, listening = self.space(ns)
        argv = [pfx, str(cursor), pattern.encode("utf-8"), str(count), "1" if delete else "0"]
        cursor, found = yield SCRIPT, _S["SCAN"], (index, deadlines, listening), argv
        return int(cursor), found

    def scan(self, ns, cursor, pattern, count):
        cursor, found = yield from self._scan_step(ns, cursor, pattern, count, False)
        return [cursor, _members(found)]

    def scan_delete(self, ns, cursor, pattern, count):
        cursor, removed = yield from self._scan_step(ns, cursor, pattern, count, True)
        return [cursor, int(removed)]

    def keys_match(self, ns, pattern):
        cursor = 0
        seen: dict[str, None] = {}
        while True:
            cursor, found = yield from self._scan_step(ns, cursor, pattern, 1000, False)
            for key in _members(found):
                seen[key] = None
            if not cursor:
                return list(seen)

    def stats(self):
        store_keys = yield from self.count("")
        info = {}
        for section in ("memory", "server", "stats", "clients"):
            found = yield CMD, ("INFO", section)
            if isinstance(found, dict):
                info.update(found)
        server = info
        queues = yield KEYSCAN, ("{" + self._prefix + ":lock:*}:q").encode()
        held = yield KEYSCAN, ("{" + self._prefix + ":lock:*}:h").encode()
        waiting = 0
        for queue in queues:
            waiting += int((yield CMD, ("LLEN", queue)))
        return {
            "ops": self.ops_count(),
            "locks": {
                "held_count": len(held),
                "waiting": waiting,
                "held": [{"key": _text(k)[len(self._prefix) + 7 : -3]} for k in held],
            },
            "engine": self.capabilities["engine"],
            "address": self.config.description,
            "key_prefix": self._prefix,
            "capabilities": self.capabilities,
            "store": {"keys": store_keys},
            "server": {
                "version": server.get("redis_version") or server.get("valkey_version"),
                "used_memory": info.get("used_memory"),
                "maxmemory": info.get("maxmemory"),
                "maxmemory_policy": _text(info.get("maxmemory_policy")),
                "keyspace_hits": info.get("keyspace_hits"),
                "keyspace_misses": info.get("keyspace_misses"),
                "ops_per_second": info.get("instantaneous_ops_per_sec"),
                "connected_clients": info.get("connected_clients"),
            },
        }

    # -- locks (the protocol is drawn in .scripts) -----------------------------------------------

    def _lock_keys(self, key: str) -> tuple[bytes, tuple]:
        base = ("{" + self._prefix + ":lock:" + key + "}").encode("utf-8")
        return base, (base + b":h", base + b":q", base + b":w", base + b":f")

    def lock_acquire(self, key, lease, wait):
        """A FIFO wait: queued on the server; a release hands the lock straight
        to the first live waiter and posts the fence to its mailbox, on which
        it blocks (BLPOP); it asks again (which keeps its place) at least every
        third of LOCK_HEARTBEAT, and when the holder's lease ends."""
        token = os.urandom(16)
        base, keys = self._lock_keys(key)
        lease_ms = self._lease_ms if lease is None else max(1, math.ceil(lease * 1000))
        if wait is None:
            mode = "forever"
        elif wait <= 0:
            mode = "try"
        else:
            mode = f"in:{math.ceil(wait * 1000)}"
        mailbox = base + b":g:" + token
        hb = self._heartbeat_ms
        heartbeat = self.config.lock_heartbeat
        argv = [token, str(lease_ms), mode, hb, base]
        try:
            while True:
                reply = yield SCRIPT, _S["LOCK_ACQUIRE"], keys, argv
                if reply[0] == 1:
                    if lease is None:
                        yield HOLD, key, token, lease_ms, True, False
                    return [token, int(reply[1])]
                if reply[1] == -1 and len(reply) == 2:
                    return None
                _deadline, left, pttl = reply[1], reply[2], reply[3]
                if _deadline >= 0:
                    argv[2] = f"at:{_deadline}"
                # Redis times a blocked command out on its hz tick (10 a second
                # by default): a BLPOP may end up to 100 ms after its timeout. So
                # the wait ends 100 ms before the holder's lease (or our own
                # deadline) runs out, and the last stretch is slept, to ask
                # again the moment it ends: a dead holder's lock is free within
                # its lease, not up to a tick later (bench_redis: max 1,024 ms
                # with a 1 s lease before this).
                ends = heartbeat / 3
                if left >= 0:
                    ends = min(ends, left / 1000 + 0.002)
                if pttl > 0:
                    ends = min(ends, pttl / 1000 + 0.002)
                if ends <= _HZ_SLACK + 0.01 and ends < heartbeat / 3:
                    yield SLEEP, ends
                    continue
                if ends < heartbeat / 3:
                    ends -= _HZ_SLACK
                posted = yield BLOCK, mailbox, max(0.01, min(ends, self.timeout / 2))
                if posted:
                    # Handed over by a release, with a first lease of at most
                    # one heartbeat: the watchdog extends it to ours at once.
                    longer = lease_ms > int(hb)
                    if lease is None or longer:
                        yield HOLD, key, token, lease_ms, lease is None, longer
                    return [token, int(posted[1])]
        except GeneratorExit:
            raise
        except BaseException:
            # Interrupted (a cancelled task, a lost connection, Ctrl-C): take the
            # wait back, and give back a grant that raced the interruption.
            yield SCRIPT, _S["LOCK_CANCEL"], keys, [token, base, hb]
            yield DROP, token
            raise

    def lock_cancel(self, key, token):
        base, keys = self._lock_keys(key)
        found = yield SCRIPT, _S["LOCK_CANCEL"], keys, [token, base, self._heartbeat_ms]
        yield DROP, token
        return bool(found)

    def lock_release(self, key, token):
        base, keys = self._lock_keys(key)
        yield DROP, token
        result = yield SCRIPT, _S["LOCK_RELEASE"], keys, [token, base, self._heartbeat_ms]
        if result == -1:
            raise LockNotOwned(f"lock {key!r} is not held with this token (released, or its lease ran out)")
        return bool(result)

    def lock_extend(self, key, token, lease):
        _base, keys = self._lock_keys(key)
        ok = yield SCRIPT, _S["LOCK_EXTEND"], keys[:1], [token, str(max(1, math.ceil(lease * 1000)))]
        if not ok:
            raise LockNotOwned(f"lock {key!r} is not held with this token (released, or its lease ran out)")
        return True

    def lock_status(self, key, token):
        _base, keys = self._lock_keys(key)
        holder = yield CMD, ("HGET", keys[0], "tok")
        return [holder is not None, token is not None and holder == token]

    # -- what this engine refuses ------------------------------------------------------------------

    def _no_listen(self, *args):
        raise Unsupported(LISTEN_ON_CHANNEL)
        yield  # pragma: no cover - a plan is a generator

    def _no_near(self, *args):
        raise Unsupported(TRACK_ON_CONNECTION)
        yield  # pragma: no cover


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
