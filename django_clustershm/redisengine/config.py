"""``CLUSTERSHM["ENGINE"]``: which Redis (or Valkey), and how to reach it.

=====================================================  =====================================
``redis://[user:password@]host:6379/0``                 one server (``valkey://`` is an alias)
``rediss://...``                                        the same over TLS (``valkeys://``)
``unix:///run/redis.sock?db=0``                         one server on a Unix socket
``redis+sentinel://[user:pw@]s1:26379,s2:26379/mymaster/0``  the primary Sentinel names
``redis+cluster://[user:pw@]h1:7000,h2:7001``           a Redis Cluster (startup nodes)
=====================================================  =====================================

(``rediss+sentinel://`` and ``rediss+cluster://`` use TLS.) Credentials in
the URL are those of the data nodes; a Sentinel's own are in
``ENGINE_OPTIONS["SENTINEL_KWARGS"]``. TLS options (``ssl_ca_certs``,
``ssl_certfile``...) go in ``ENGINE_OPTIONS["CONNECTION_KWARGS"]``, handed
to redis-py as they are.

``ENGINE_OPTIONS`` (all optional):

=======================  ======================================================
``KEY_PREFIX``           prefix of every key (default ``"cshm"``): several
                         sites on one Redis use different prefixes
``LOCK_LEASE``           seconds a lock taken without a lease is held when its
                         holder stops renewing it (default 10; a watchdog
                         renews it every third of that while the holder lives)
``LOCK_HEARTBEAT``       seconds a dead queued waiter can delay the others
                         (default 2: a waiter renews its place every third)
``STRICT_LEASE``         seconds a hung process can hold up a writer that waits
                         for its acknowledgement (a strict near cache's holder,
                         a strict listener; default 2: it renews every third,
                         and a holder serves its copies only while it runs)
``STRICT_LISTENERS``     a write returns once every live listening process ran
                         its callbacks for it (default False: eventual)
``SIGN_VALUES``          sign values with HMAC-SHA256 (default True; see .values)
``SIGNING_KEY``          the secret values are signed with (default: SECRET_KEY)
``CONNECTION_KWARGS``    more keyword arguments for redis-py's clients
``SENTINEL_KWARGS``      keyword arguments for the Sentinel connections
=======================  ======================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..exceptions import InvalidArgument

DEFAULT_LOCK_LEASE = 10.0
DEFAULT_LOCK_HEARTBEAT = 2.0
DEFAULT_STRICT_LEASE = 2.0
DEFAULT_PREFIX = "cshm"

_OPTION_NAMES = frozenset(
    {
        "KEY_PREFIX",
        "LOCK_LEASE",
        "LOCK_HEARTBEAT",
        "STRICT_LEASE",
        "STRICT_LISTENERS",
        "SIGN_VALUES",
        "SIGNING_KEY",
        "CONNECTION_KWARGS",
        "SENTINEL_KWARGS",
    }
)


def is_local(engine: str | None) -> bool:
    return engine in (None, "", "local")


@dataclass
class EngineConfig:
    """An ENGINE URL and its options, checked."""

    url: str
    kind: str  # "standalone", "sentinel" or "cluster"
    prefix: str = DEFAULT_PREFIX
    lock_lease: float = DEFAULT_LOCK_LEASE
    lock_heartbeat: float = DEFAULT_LOCK_HEARTBEAT
    strict_lease: float = DEFAULT_STRICT_LEASE
    strict_listeners: bool = False
    sign_values: bool = True
    signing_key: str | bytes | None = None
    connection_kwargs: dict = field(default_factory=dict)
    sentinel_kwargs: dict = field(default_factory=dict)
    # parsed from the URL
    nodes: list = field(default_factory=list)  # [(host, port)] for sentinel and cluster
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str, options: dict | None = None) -> EngineConfig:
        if not isinstance(url, str):
            raise InvalidArgument(f"CLUSTERSHM ENGINE must be 'local' or a redis:// URL, not {url!r}")
        options = dict(options or {})
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise InvalidArgument(
                f"unknown ENGINE_OPTIONS {sorted(unknown)}; known: {', '.join(sorted(_OPTION_NAMES))}"
            )
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        kinds = {
            "redis": ("standalone", False),
            "valkey": ("standalone", False),
            "rediss": ("standalone", True),
            "valkeys": ("standalone", True),
            "unix": ("standalone", False),
            "redis+sentinel": ("sentinel", False),
            "rediss+sentinel": ("sentinel", True),
            "valkey+sentinel": ("sentinel", False),
            "redis+cluster": ("cluster", False),
            "rediss+cluster": ("cluster", True),
            "valkey+cluster": ("cluster", False),
        }
        if scheme not in kinds:
            raise InvalidArgument(
                f"CLUSTERSHM ENGINE {_safe(url)!r}: the scheme must be one of "
                f"{', '.join(sorted(kinds))} (or ENGINE 'local')"
            )
        kind, tls = kinds[scheme]
        config = cls(url=url, kind=kind, tls=tls)
        config.prefix = str(options.get("KEY_PREFIX", DEFAULT_PREFIX))
        if not config.prefix or "{" in config.prefix or "}" in config.prefix:
            raise InvalidArgument("ENGINE_OPTIONS KEY_PREFIX must be a non-empty str without braces")
        config.lock_lease = _seconds(options.get("LOCK_LEASE", DEFAULT_LOCK_LEASE), "LOCK_LEASE")
        config.lock_heartbeat = _seconds(options.get("LOCK_HEARTBEAT", DEFAULT_LOCK_HEARTBEAT), "LOCK_HEARTBEAT")
        config.strict_lease = _seconds(options.get("STRICT_LEASE", DEFAULT_STRICT_LEASE), "STRICT_LEASE")
        strict_listeners = options.get("STRICT_LISTENERS", False)
        if not isinstance(strict_listeners, bool):
            raise InvalidArgument(f"ENGINE_OPTIONS STRICT_LISTENERS is True or False, not {strict_listeners!r}")
        config.strict_listeners = strict_listeners
        config.sign_values = bool(options.get("SIGN_VALUES", True))
        config.signing_key = options.get("SIGNING_KEY")
        config.connection_kwargs = dict(options.get("CONNECTION_KWARGS") or {})
        config.sentinel_kwargs = dict(options.get("SENTINEL_KWARGS") or {})
        if kind != "standalone":
            parts = urlsplit(url)
            config.username = unquote(parts.username) if parts.username else None
            config.password = unquote(parts.password) if parts.password else None
            hosts = parts.netloc.rsplit("@", 1)[-1]
            for item in hosts.split(","):
                host, _, port = item.rpartition(":")
                if not host or not port.isdigit():
                    raise InvalidArgument(f"CLUSTERSHM ENGINE {_safe(url)!r}: {item!r} is not host:port")
                config.nodes.append((host.strip("[]"), int(port)))
            path = [p for p in parts.path.split("/") if p]
            if kind == "sentinel":
                if not path:
                    raise InvalidArgument(
                        f"CLUSTERSHM ENGINE {_safe(url)!r}: name the service, redis+sentinel://host:port/SERVICE/DB"
                    )
                config.service = path[0]
                config.db = int(path[1]) if len(path) > 1 else int(parse_qs(parts.query).get("db", ["0"])[0])
            elif path:
                raise InvalidArgument(f"CLUSTERSHM ENGINE {_safe(url)!r}: a Redis Cluster has no database number")
        return config

    @property
    def description(self) -> str:
        """Where the engine is, without credentials (for logs and stats)."""
        return _safe(self.url)

    # -- redis-py clients -------------------------------------------------------------------

    def _common(self, timeout: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": False,
        }
        kwargs.update(self.connection_kwargs)
        return kwargs

    def sync_client(self, timeout: float):
        """redis-py's blocking client for this engine."""
        import redis
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry
        from redis.sentinel import Sentinel

        return self._client(timeout, redis.Redis, RedisCluster, ClusterNode, Sentinel, Retry)

    def async_client(self, timeout: float):
        """redis-py's asyncio client for this engine (one per event loop)."""
        import redis.asyncio as aredis
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel

        return self._client(timeout, aredis.Redis, RedisCluster, ClusterNode, Sentinel, Retry)

    def _client(self, timeout: float, redis_class, cluster_class, node_class, sentinel_class, retry_class):
        """One recipe for both flavours of redis-py (their classes take the same arguments)."""
        from redis.backoff import NoBackoff

        kwargs = self._common(timeout)
        if self.kind == "cluster":
            return cluster_class(
                startup_nodes=[node_class(h, p) for h, p in self.nodes],
                username=self.username,
                password=self.password,
                ssl=self.tls,
                **kwargs,
            )
        # No retry of a command whose connection broke: it may have run (an
        # INCR applied twice). The call fails with ManagerUnavailable; the next
        # one connects again (to the new primary, after a failover).
        kwargs.setdefault("retry", retry_class(NoBackoff(), 0))
        if self.kind == "sentinel":
            sentinel = sentinel_class(
                self.nodes,
                sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **self.sentinel_kwargs},
                ssl=self.tls,
                **kwargs,
            )
            return sentinel.master_for(self.service, db=self.db, username=self.username, password=self.password)
        url = self.url
        for alias, real in (("valkeys://", "rediss://"), ("valkey://", "redis://")):
            if url.lower().startswith(alias):
                url = real + url[len(alias) :]
        return redis_class.from_url(url, **kwargs)


def _seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"ENGINE_OPTIONS {name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _safe(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in creds else '***'}@{host}"
