"""The fixtures that start real Redis and Valkey servers (tests/redis_servers.py) work: each
answers redis-py, a cluster keeps a hash tag in one slot, a cluster and a Sentinel group fail
over when their primary is SIGKILLed, and no process outlives ``stop()``."""

from __future__ import annotations

import os
import time

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[test]'")

from redis.cluster import RedisCluster  # noqa: E402
from redis.sentinel import Sentinel  # noqa: E402

from . import redis_servers  # noqa: E402
from .redis_servers import HOST, RedisServer  # noqa: E402

#: What a client sees while a primary is dead and before its replica took over.
TRANSIENT = (
    redis.exceptions.ConnectionError,  # includes MasterNotFoundError (Sentinel)
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
)


def until_it_works(fn, timeout: float = 15.0):
    """Call ``fn`` until it stops raising a TRANSIENT error; return (its result, the seconds
    it took, the errors seen). The last error propagates after ``timeout`` seconds."""
    t0 = time.monotonic()
    errors: list[str] = []
    while True:
        try:
            return fn(), time.monotonic() - t0, errors
        except TRANSIENT as exc:
            errors.append(type(exc).__name__)
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.05)


def test_find_binary(monkeypatch):
    for kind in redis_servers.KINDS:
        path = redis_servers.find_binary(kind)
        assert path is None or os.access(path, os.X_OK)
    with pytest.raises(ValueError):
        redis_servers.find_binary("redis-benchmark")
    monkeypatch.setenv("CLUSTERSHM_TEST_REDIS_CLI", "/nonexistent/redis-cli")
    assert redis_servers.find_binary("redis-cli") is None  # an override is not second-guessed


# -- standalone ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["redis_server", "valkey_server"])
def test_standalone_answers_over_tcp_and_the_unix_socket(request, fixture):
    server = request.getfixturevalue(fixture)
    assert server.url == f"redis://{HOST}:{server.port}/0"
    assert server.unix_url == f"unix://{server.unix_socket}?db=0"
    assert oct(os.stat(server.unix_socket).st_mode & 0o777) == "0o700"
    for url in (server.url, server.unix_url):
        with redis.Redis.from_url(url) as client:
            assert client.ping()
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
    assert server.cli("PING") == "PONG\n"
    name = "valkey" if fixture == "valkey_server" else "redis"
    assert redis_servers.info(server.port, "server").get("server_name", "redis") == name


def test_password_and_acl_user_urls(redis_server):
    with RedisServer(redis_server.binary, password="s3cr:t@") as server:
        assert server.url == f"redis://:s3cr%3At%40@{HOST}:{server.port}/0"
        for url in (server.url, server.unix_url):
            with redis.Redis.from_url(url) as client:
                assert client.ping()
        # Refusals checked with the fixtures' own client: redis-py retries them for seconds.
        with pytest.raises(redis_servers.ReplyError, match="NOAUTH"):
            redis_servers.command(server.port, "PING")
        assert server.cli("PING") == "PONG\n"
    redis_servers.assert_stopped(server)

    with RedisServer(redis_server.binary, username="app", password="pw") as server:
        assert server.url == f"redis://app:pw@{HOST}:{server.port}/0"
        for url in (server.url, server.unix_url):
            with redis.Redis.from_url(url) as client:
                assert client.acl_whoami() == "app"
        with pytest.raises(redis_servers.ReplyError, match="WRONGPASS"):
            redis_servers.command(server.port, "PING", username="app", password="nope")
    redis_servers.assert_stopped(server)


def test_stop_and_kill_leave_no_process(redis_server):
    server = RedisServer(redis_server.binary)
    pid, directory = server.pid, server.dir
    assert server.alive_pids() == [pid] and not redis_servers.gone(pid)
    server.kill()
    assert redis_servers.gone(pid) and server.alive_pids() == []
    with redis.Redis.from_url(server.url) as client, pytest.raises(redis.ConnectionError):
        client.ping()
    server.stop()
    server.stop()  # a second stop does nothing
    redis_servers.assert_stopped(server)
    assert not os.path.exists(directory)


def test_a_forked_child_does_not_stop_its_parents_servers(redis_server):
    pid = os.fork()
    if pid == 0:  # what an atexit hook in a forked test process would run
        try:
            redis_servers._stop_all()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert redis_server.alive_pids() == [redis_server.pid]
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping()


# -- cluster ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["redis_cluster", "valkey_cluster"])
def test_cluster_answers_and_keeps_a_hash_tag_in_one_slot(request, fixture):
    cluster = request.getfixturevalue(fixture)
    assert cluster.url == "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in cluster.ports)
    roles = sorted(node.role for node in cluster.nodes)
    assert roles == ["primary"] * 3 + ["replica"] * 3
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        assert client.ping(target_nodes=RedisCluster.ALL_NODES)
        tagged = [f"{{t-{fixture}}}:{i}" for i in range(20)]
        slots = {client.keyslot(key) for key in tagged}
        assert len(slots) == 1
        assert {redis_servers.command(cluster.ports[0], "CLUSTER", "KEYSLOT", key) for key in tagged} == slots
        assert len({cluster.primary_of(key).port for key in tagged}) == 1
        assert client.mset(dict.fromkeys(tagged, b"v"))  # one slot: one MSET
        assert client.mget(tagged) == [b"v"] * len(tagged)
        untagged = [f"t-{fixture}:{i}" for i in range(20)]
        assert len({client.keyslot(key) for key in untagged}) > 1
        assert len({cluster.primary_of(key).port for key in untagged}) == 3
        client.delete(*tagged)
    finally:
        client.close()


@pytest.mark.slow
def test_cluster_fails_over_when_a_primary_is_killed(fresh_redis_cluster):
    cluster = fresh_redis_cluster
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        client.set("failover-key", "before")
        victim = cluster.kill_primary_of("failover-key")
        assert redis_servers.gone(victim.pid)
        _, seconds, errors = until_it_works(lambda: client.set("failover-key", "after"))
        cluster.wait_ok()
        assert client.get("failover-key") == b"after"
        promoted = cluster.primary_of("failover-key")
        assert promoted.port != victim.port
        roles = {node.port: node.role for node in cluster.nodes}
        assert roles[victim.port] == "down" and roles[promoted.port] == "primary"
        assert sorted(roles.values()) == ["down"] + ["primary"] * 3 + ["replica"] * 2
        print(f"cluster failover: writes worked again after {seconds:.2f}s, {len(errors)} errors: {set(errors)}")
    finally:
        client.close()


# -- Sentinel --------------------------------------------------------------------------------


def test_sentinel_answers(redis_sentinel):
    ports = redis_sentinel.sentinel_ports
    assert redis_sentinel.url == f"redis+sentinel://{HOST}:{ports[0]},{HOST}:{ports[1]},{HOST}:{ports[2]}/mymaster/0"
    sentinel = Sentinel(redis_sentinel.sentinels, socket_timeout=1)
    assert sentinel.discover_master("mymaster") == redis_sentinel.primary_address()
    assert [node.role for node in redis_sentinel.nodes] == ["primary", "replica"]
    primary = sentinel.master_for("mymaster", socket_timeout=1)
    replica = sentinel.slave_for("mymaster", socket_timeout=1)
    try:
        assert primary.ping() and replica.ping()
        primary.set("t-sentinel", "v")
        assert primary.get("t-sentinel") == b"v"
        primary.delete("t-sentinel")
    finally:
        primary.close()
        replica.close()


@pytest.mark.slow
def test_sentinel_fails_over_when_the_primary_is_killed(fresh_redis_sentinel):
    group = fresh_redis_sentinel
    sentinel = Sentinel(group.sentinels, socket_timeout=1)
    primary = sentinel.master_for("mymaster", socket_timeout=1)
    try:
        primary.set("failover-key", "before")
        victim = group.kill_primary()
        assert redis_servers.gone(victim.pid)
        _, seconds, errors = until_it_works(lambda: primary.set("failover-key", "after"))
        host, port = group.wait_failover()
        assert (host, port) != (HOST, victim.port)
        assert sentinel.discover_master("mymaster") == (host, port)
        assert primary.get("failover-key") == b"after"
        assert {node.port: node.role for node in group.nodes} == {victim.port: "down", port: "primary"}
        print(f"sentinel failover: writes worked again after {seconds:.2f}s, {len(errors)} errors: {set(errors)}")
    finally:
        primary.close()
