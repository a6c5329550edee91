"""Settings: ``CLUSTERSHM = {...}`` in Django settings, all optional.

==================  =========================================================
``ADDRESS``          socket path of a running cluster to attach to
``SECRET_FILE``      file holding its secret (default: ``secret`` beside it)
``TIMEOUT``          seconds any call may take (default 5)
``MAX_KEY_SIZE``     bytes of a key in UTF-8 (default 4096)
``MAX_VALUE_SIZE``   bytes of a stored (serialized, compressed) value (default 32 MiB)
``MAX_STORE_BYTES``  budget of the shared store (default: a quarter of the
                     memory, RAM or the cgroup's limit: ``StoreFull`` beyond)
``MAX_CACHE_BYTES``  the most a cache's MAX_BYTES may be (default 1 GiB): a
                     larger one (whatever a client sends) is clamped to it
``MAX_TOTAL_CACHE_BYTES``  what all caches' MAX_BYTES may add up to (default:
                     a quarter of the memory); a cache past it is refused
``NEAR_CACHE``       the near cache of the store's reads: on by default in
                     cluster mode on the local engine (2,000 entries, 4 MiB a
                     process, adaptive); ``{"MAX_ENTRIES": n, "MAX_BYTES": n,
                     "POLICY": ...}`` to size it, ``False`` for none (see
                     :mod:`.client.near`)
``ON_START``         dotted path of a function run once per cluster start,
                     against the Manager, before any worker (runcluster and
                     the gunicorn config module; see :mod:`.serve.cluster`)
``CLIENT_SPIN``      seconds a call polls for its reply before sleeping
                     (default 20e-6, adaptive; 0: never)
``SNAPSHOT``         ``{"PATH": ..., "INTERVAL": seconds or None, "ON_ERROR":
                     "start_empty" or "refuse"}``: keep the state in a file
                     across restarts (off by default; see
                     :mod:`.server.snapshot`)
``ENGINE``           ``"local"`` (the default: a Manager in the master, or
                     embedded) or a Redis/Valkey URL (``redis://host:6379/0``,
                     ``rediss://``, ``unix://``, ``redis+sentinel://``,
                     ``redis+cluster://``): every worker of every host then
                     shares one state there (see :mod:`.redisengine`)
``ENGINE_OPTIONS``   the Redis engine's few knobs (KEY_PREFIX, LOCK_LEASE,
                     LOCK_HEARTBEAT, SIGN_VALUES, SIGNING_KEY...: see
                     :mod:`.redisengine.config`)
``AUTO_ATTACH``      whether a management command run from the command line
                     attaches to the project's running cluster (default True;
                     see :mod:`.registry`)
``METRICS``          who may read the Prometheus metrics besides staff:
                     ``{"TOKEN": "...", "ALLOWED_IPS": ["10.0.0.0/8"]}`` (a
                     bearer token; REMOTE_ADDR in a network); see
                     :mod:`.dashboard.views` and docs/dashboard.md
==================  =========================================================

Which Manager those settings lead to is :mod:`.registry`'s business.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .client.socket import DEFAULT_SPIN
from .client.transport import DEFAULT_TIMEOUT
from .exceptions import InvalidArgument
from .server.snapshot import SnapshotConfig, config_from_settings
from .wire.limits import DEFAULT_MAX_CACHE_BYTES, DEFAULT_MAX_KEY, DEFAULT_MAX_VALUE, Limits

#: One defaults table (diskcache's ``DEFAULT_SETTINGS``).
DEFAULTS: dict[str, Any] = {
    "ADDRESS": None,
    "SECRET_FILE": None,
    "TIMEOUT": DEFAULT_TIMEOUT,
    "MAX_KEY_SIZE": DEFAULT_MAX_KEY,
    "MAX_VALUE_SIZE": DEFAULT_MAX_VALUE,
    "MAX_STORE_BYTES": None,
    "MAX_CACHE_BYTES": DEFAULT_MAX_CACHE_BYTES,
    "MAX_TOTAL_CACHE_BYTES": None,
    "NEAR_CACHE": None,
    "ON_START": None,
    "CLIENT_SPIN": DEFAULT_SPIN,
    "SNAPSHOT": None,
    "AUTO_ATTACH": True,
    "ENGINE": "local",
    "ENGINE_OPTIONS": {},
    "METRICS": None,
}

#: A near cache's bounds and policy when NEAR_CACHE gives none. Modest, since
#: it is on by default and each worker has its own: 16 workers hold 64 MiB at
#: most between them. (#19: bench/bench_near.py measured the defaults.)
NEAR_CACHE_DEFAULTS = {"MAX_ENTRIES": 2_000, "MAX_BYTES": 4 * 2**20, "POLICY": "adaptive"}


def settings() -> dict[str, Any]:
    """``DEFAULTS`` updated with Django's ``settings.CLUSTERSHM``, if Django is configured."""
    merged = dict(DEFAULTS)
    try:
        from django.conf import settings as dj_settings

        if dj_settings.configured:
            merged.update(getattr(dj_settings, "CLUSTERSHM", {}) or {})
    except ImportError:  # pragma: no cover - Django is a dependency, but the client does not need it
        pass
    return merged


def limits_from_settings(conf: dict[str, Any] | None = None) -> Limits:
    conf = conf or settings()
    return Limits(max_key=int(conf["MAX_KEY_SIZE"]), max_value=int(conf["MAX_VALUE_SIZE"]))


def engine_options(conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Manager's engine as the settings describe it (the settings the Manager trusts)."""
    conf = conf or settings()
    max_store = conf["MAX_STORE_BYTES"]
    return {
        "limits": limits_from_settings(conf),
        "max_store_bytes": None if max_store is None else int(max_store),
        "max_cache_bytes": int(conf["MAX_CACHE_BYTES"]),
        "max_total_cache_bytes": None if conf["MAX_TOTAL_CACHE_BYTES"] is None else int(conf["MAX_TOTAL_CACHE_BYTES"]),
    }


#: NEAR_CACHE["CONSISTENCY"]: how far a copy may lag another process's write
#: (the local engine is always strict; the Redis engine is eventual by default).
NEAR_CONSISTENCIES = ("eventual", "strict")


#: NEAR_CACHE["POLICY"]: which keys a process keeps copies of (see
#: :class:`.client.near.NearCache`): "adaptive", those it read twice while
#: they were not written over and over meanwhile; "always", every key it reads.
NEAR_POLICIES = ("adaptive", "always")


class NearOptions(NamedTuple):
    """A NEAR_CACHE setting, checked; the arguments of ``Client.enable_near_cache``."""

    max_entries: int
    max_bytes: int
    consistency: str | None = None
    policy: str = "adaptive"
    #: Not asked for (NEAR_CACHE left out): on only where the engine makes near
    #: caches its default (the local engine over a socket: strict, and cheap).
    implicit: bool = False


def near_options(options) -> NearOptions | None:
    """A NEAR_CACHE setting checked: None if off (``False``). Left out (None),
    the defaults, marked implicit; ``True`` or a dict, asked for."""
    implicit = options is None
    if options is False:
        return None
    if options is None or options is True:
        options = {}
    if not isinstance(options, dict):
        raise InvalidArgument(
            f"NEAR_CACHE is a dict (MAX_ENTRIES, MAX_BYTES, CONSISTENCY, POLICY) or False, not {options!r}"
        )
    unknown = set(options) - {"MAX_ENTRIES", "MAX_BYTES", "CONSISTENCY", "POLICY"}
    if unknown:
        raise InvalidArgument(
            f"unknown NEAR_CACHE option(s) {sorted(unknown)}: MAX_ENTRIES, MAX_BYTES, CONSISTENCY and POLICY are known"
        )
    consistency = options.get("CONSISTENCY")
    if consistency is not None and consistency not in NEAR_CONSISTENCIES:
        raise InvalidArgument(f"NEAR_CACHE CONSISTENCY is 'eventual' or 'strict', not {consistency!r}")
    policy = options.get("POLICY", NEAR_CACHE_DEFAULTS["POLICY"])
    if policy not in NEAR_POLICIES:
        raise InvalidArgument(f"NEAR_CACHE POLICY is 'adaptive' or 'always', not {policy!r}")
    return NearOptions(
        int(options.get("MAX_ENTRIES", NEAR_CACHE_DEFAULTS["MAX_ENTRIES"])),
        int(options.get("MAX_BYTES", NEAR_CACHE_DEFAULTS["MAX_BYTES"])),
        consistency,
        policy,
        implicit,
    )


def snapshot_options(conf: dict[str, Any] | None = None) -> SnapshotConfig | None:
    """The SNAPSHOT setting, checked (None: off); ``SnapshotRefused`` in one sentence if it cannot work."""
    conf = conf or settings()
    return config_from_settings(conf.get("SNAPSHOT"))


def remote_engine(conf: dict[str, Any] | None = None) -> str | None:
    """The ENGINE URL if the settings name a remote engine (Redis, Valkey), else None."""
    conf = conf or settings()
    engine = conf.get("ENGINE")
    if engine in (None, "", "local"):
        return None
    return engine


def secret_key() -> str | None:
    """Django's SECRET_KEY, if Django is configured (the Redis engine signs values with a key derived from it)."""
    try:
        from django.conf import settings as dj_settings

        if dj_settings.configured:
            return getattr(dj_settings, "SECRET_KEY", None) or None
    except ImportError:  # pragma: no cover
        pass
    return None
