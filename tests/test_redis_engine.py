"""The Redis engine's own guarantees (#15): signed values, its settings, its
watchdog and fair lock with real processes, failovers; the shared contract
runs on it through the ``client``, ``anywhere`` and ``shared`` fixtures."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import time

import pytest

import django_clustershm as clustershm
from django_clustershm import registry
from django_clustershm.exceptions import (
    AuthenticationFailed,
    BadSignature,
    InvalidArgument,
    LockNotOwned,
    ManagerUnavailable,
)
from django_clustershm.redisengine import EngineConfig

from . import redis_servers
from .conftest import _binary, remote_options
from .helpers import block_until_killed, fork_call, lock_waiters, reap, wait_until

# -- the setting ------------------------------------------------------------------------------


def test_engine_urls_parse_and_bad_ones_say_why():
    assert EngineConfig.parse("redis://127.0.0.1:6379/0").kind == "standalone"
    assert EngineConfig.parse("valkey://h:1/2").kind == "standalone"
    assert EngineConfig.parse("unix:///run/redis.sock?db=1").kind == "standalone"
    assert EngineConfig.parse("rediss://h:6380/0").tls
    sentinel = EngineConfig.parse("redis+sentinel://u:pw@s1:26379,s2:26380/mymaster/3")
    assert (sentinel.kind, sentinel.nodes, sentinel.service, sentinel.db) == (
        "sentinel",
        [("s1", 26379), ("s2", 26380)],
        "mymaster",
        3,
    )
    assert (sentinel.username, sentinel.password) == ("u", "pw")
    cluster = EngineConfig.parse("redis+cluster://:secret@h1:7000,h2:7001")
    assert (cluster.kind, cluster.nodes, cluster.password) == ("cluster", [("h1", 7000), ("h2", 7001)], "secret")
    assert "secret" not in cluster.description
    with pytest.raises(InvalidArgument, match="scheme must be one of"):
        EngineConfig.parse("http://h:1")
    with pytest.raises(InvalidArgument, match="name the service"):
        EngineConfig.parse("redis+sentinel://h:1")
    with pytest.raises(InvalidArgument, match="not host:port"):
        EngineConfig.parse("redis+cluster://h1,h2:2")
    with pytest.raises(InvalidArgument, match="unknown ENGINE_OPTIONS"):
        EngineConfig.parse("redis://h:1/0", {"LEASE": 3})
    with pytest.raises(InvalidArgument, match="LOCK_LEASE must be a positive"):
        EngineConfig.parse("redis://h:1/0", {"LOCK_LEASE": 0})


# -- signed values: never unpickle what a stranger wrote ---------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clustershm-pwned",))


def test_a_value_written_without_the_signing_key_is_refused_and_never_unpickled(redis_server):
    options = remote_options()
    client = registry.remote(redis_server.url, options)
    try:
        client.set("profile", {"name": "Tom"})
        assert client.get("profile") == {"name": "Tom"}
        rkey = client.transport.ops.space("")[0] + b"profile"
        raw = client.transport.redis.get(rkey)
        evil = pickle.dumps(_Boom())
        # A stranger with write access to Redis: a raw pickle, an unsigned value,
        # a forged signature, and a valid value copied to another key.
        for forged in (evil, b"B" + evil, b"S" + b"\x00" * 32 + evil):
            client.transport.redis.set(rkey, forged)
            with pytest.raises(BadSignature, match="refused, not unpickled"):
                client.get("profile")
        client.transport.redis.set(client.transport.ops.space("")[0] + b"other", raw)
        with pytest.raises(BadSignature, match="bad signature"):
            client.get("other")
        assert not os.path.exists("/tmp/clustershm-pwned")
        # Another site (another SECRET_KEY) reads nothing of ours.
        stranger = registry.remote(redis_server.url, {**options, "SIGNING_KEY": "another site"})
        client.set("profile", {"name": "Tom"})
        with pytest.raises(BadSignature):
            stranger.get("profile")
        stranger.transport.shutdown()
        # Integers are stored as numbers (INCRBY works on them): nothing to unpickle.
        client.set("visits", 41)
        assert client.incr("visits") == 42
    finally:
        client.transport.shutdown()


def test_signing_can_be_turned_off_for_a_private_redis(redis_server):
    client = registry.remote(redis_server.url, remote_options(SIGN_VALUES=False))
    try:
        client.set("k", [1, 2])
        assert client.get("k") == [1, 2]
        assert client.capabilities()["values_signed"] is False
    finally:
        client.transport.shutdown()


def test_listen_and_near_caches_work_on_every_remote_engine(remote):
    handle = clustershm.listen("k", lambda *a: None)  # #16 part 1: tests/test_redis_listen.py
    handle.cancel()
    client = clustershm.get_client()  # #16 part 2: tests/test_redis_near.py
    assert client.enable_near_cache("") is not None
    assert client.enable_near_cache("strict-ns", consistency="strict") is not None
    caps = client.capabilities()
    assert caps["near_cache"].startswith("eventual") and caps["near_cache_strict"].startswith("strict")


def test_capabilities_are_said_out_loud(remote):
    caps = clustershm.get_client().capabilities()
    assert caps["engine"].startswith("redis")
    assert "within one lease" in caps["lock_freed_when_holder_dies"]
    stats = clustershm.stats()
    assert stats["capabilities"] == caps
    assert stats["store"]["keys"] == 0
    clustershm.set("a", 1)
    assert clustershm.stats()["store"]["keys"] == 1


def test_a_password_url_works_and_a_wrong_one_is_refused(redis_server_with_password):
    server = redis_server_with_password
    client = registry.remote(server.url, remote_options())
    try:
        client.set("k", 1)
        assert client.get("k") == 1
    finally:
        client.transport.shutdown()
    wrong = registry.remote(server.url.replace(server.password, "wrong"), remote_options())
    with pytest.raises(AuthenticationFailed):
        wrong.get("k")
    wrong.transport.shutdown()


def test_a_server_that_is_gone_is_manager_unavailable():
    client = registry.remote("redis://127.0.0.1:1/0", remote_options(), timeout=1)
    with pytest.raises(ManagerUnavailable, match="cannot be reached"):
        client.get("k")
    client.transport.shutdown()


# -- the lock watchdog and the fair lock, with real processes -------------------------------------------


def test_the_watchdog_keeps_a_lock_for_many_leases_while_its_holder_lives(remote, monkeypatch):
    from django_clustershm.redisengine import watchdog as watchdog_module

    monkeypatch.setattr(watchdog_module, "LINGER", 0.3)  # how long the idle thread stays (5 s by default)
    lease = remote.options["LOCK_LEASE"]
    lock = clustershm.Lock("long-job")
    assert lock.acquire()
    watchdog = clustershm.get_client().transport.watchdog
    renewed = watchdog.renewals
    wait_until(lambda: watchdog.renewals >= renewed + 5, timeout=lease * 4, message="five renewals")

    def other():
        assert clustershm.Lock("long-job").acquire(blocking=False) is False

    assert reap(fork_call(other), 30) == 0
    lock.release()
    wait_until(lambda: watchdog._thread is None, message="the watchdog thread ended after the last hold")


def test_a_dead_queued_waiter_is_skipped(remote):
    """A waiter SIGKILLed while queued at the head delays the next one by at
    most its heartbeat: the lock goes to the live waiter behind it."""
    holder = clustershm.Lock("queue")
    assert holder.acquire()
    r, w = os.pipe()

    def doomed():
        os.write(w, b"q")
        clustershm.Lock("queue").acquire(timeout=60)
        block_until_killed()

    dead = fork_call(doomed)
    assert os.read(r, 1) == b"q"
    wait_until(lambda: lock_waiters("queue") == 1, message="the doomed waiter queued")

    def live():
        with clustershm.mutex("queue", timeout=60):
            clustershm.set("live-got-it", True)

    live_pid = fork_call(live)
    wait_until(lambda: lock_waiters("queue") == 2, message="the live waiter queued behind it")
    os.kill(dead, signal.SIGKILL)
    reap(dead, 10)
    holder.release()
    assert reap(live_pid, 30) == 0
    assert clustershm.get("live-got-it") is True
    os.close(r)
    os.close(w)


def test_fencing_tokens_grow_across_the_counters_expiry(remote):
    lock = clustershm.Lock("fenced")
    fences = []
    for _ in range(3):
        assert lock.acquire()
        fences.append(lock.fence)
        lock.release()
    transport = clustershm.get_client().transport
    _base, keys = transport.ops._lock_keys("fenced")
    transport.redis.delete(keys[3])  # as if the counter had expired (a day after it started)
    assert lock.acquire()
    fences.append(lock.fence)
    lock.release()
    assert fences == sorted(set(fences)), fences


def test_a_lease_overrun_makes_release_raise(remote):
    lock = clustershm.Lock("short", lease=0.2)
    assert lock.acquire()
    wait_until(lambda: not clustershm.Lock("short").locked(), message="the lease ran out")
    with pytest.raises(LockNotOwned):
        lock.release()


def test_async_waiters_are_fifo_on_redis(remote):
    async def main():
        order = []
        holder = clustershm.AsyncLock("afifo")
        assert await holder.acquire()

        async def waiter(i):
            async with clustershm.amutex("afifo", timeout=30):
                order.append(i)

        tasks = []
        for i in range(20):
            tasks.append(asyncio.ensure_future(waiter(i)))
            deadline = time.monotonic() + 10
            while lock_waiters("afifo") < i + 1:  # queued, in this order (a condition with a deadline)
                assert time.monotonic() < deadline, f"waiter {i} never queued"
                await asyncio.sleep(0.005)
        await holder.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == list(range(20))


# -- failover -----------------------------------------------------------------------------------


def _until_it_works(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    failures = 0
    while True:
        try:
            return fn(), failures
        except ManagerUnavailable:
            failures += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_sentinel_failover_is_survived_without_a_new_client(fresh_redis_sentinel):
    client = registry.remote(fresh_redis_sentinel.url, remote_options(), timeout=1)
    try:
        client.set("before", 1)
        fresh_redis_sentinel.kill_primary()
        value, failures = _until_it_works(lambda: client.incr("after", default=0))
        assert value >= 1
        print(f"{failures} calls failed with ManagerUnavailable during the failover")
        assert client.get("after") >= 1
    finally:
        client.transport.shutdown()


def test_a_cluster_failover_is_survived_without_a_new_client(fresh_redis_cluster):
    client = registry.remote(fresh_redis_cluster.url, remote_options(), timeout=1)
    try:
        client.set("before", 1)
        fresh_redis_cluster.kill_primary_of(client.transport.ops.space("")[0].decode() + "before")
        value, failures = _until_it_works(lambda: client.incr("after", default=0))
        assert value >= 1
        print(f"{failures} calls failed with ManagerUnavailable during the failover")
    finally:
        client.transport.shutdown()


def test_a_unix_socket_url_and_the_seeds_lru_api(redis_server, settings):
    settings.CLUSTERSHM = {"ENGINE": redis_server.unix_url, "ENGINE_OPTIONS": remote_options()}
    registry.reset()
    try:
        clustershm.set_lru("item", {"user": "Tom"})
        assert clustershm.get_lru("item") == {"user": "Tom"}
        assert clustershm.remove_lru("item") is True
        assert clustershm.get_lru("item") is None
        assert registry.mode() == "remote"
    finally:
        registry.current().transport.shutdown()
        registry.reset()


def test_a_tls_url_works(tmp_path):
    """rediss:// with the server's CA: the same API over TLS (the server's own test certificate)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = redis_servers.free_port()
    server = redis_servers.RedisServer(
        _binary("redis-server"),
        extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"],
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        client = registry.remote(url, remote_options(CONNECTION_KWARGS={"ssl_ca_certs": str(cert)}))
        client.set("over-tls", {"ok": True})
        assert client.get("over-tls") == {"ok": True}
        token, _fence = client.lock_acquire("tls-lock", None, 0)
        assert client.lock_release("tls-lock", token) is False
        client.transport.shutdown()
        untrusted = registry.remote(url, remote_options(), timeout=2)  # no CA: the certificate is refused
        with pytest.raises(ManagerUnavailable):
            untrusted.get("over-tls")
        untrusted.transport.shutdown()
    finally:
        server.stop()
        redis_servers.assert_stopped(server)


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_locks_work_again_after_a_primary_failover(kind, request, settings):
    """A lock held across a failover: its holder's release either succeeds (the
    grant was replicated) or raises LockNotOwned, never hangs; and the lock is
    free for others afterwards (no stale queue left behind)."""
    group = request.getfixturevalue(f"fresh_redis_{kind}")
    options = remote_options(LOCK_LEASE=1.0, LOCK_HEARTBEAT=1.0)
    settings.CLUSTERSHM = {"ENGINE": group.url, "ENGINE_OPTIONS": options, "TIMEOUT": 1.0}
    registry.reset()
    try:
        lock = clustershm.Lock("across")
        assert lock.acquire()
        client = clustershm.get_client()
        if kind == "sentinel":
            group.kill_primary()
        else:
            base, _keys = client.transport.ops._lock_keys("across")
            group.kill_primary_of(base.decode() + ":h")
        try:
            lock.release()
        except (LockNotOwned, ManagerUnavailable):
            pass  # lost with the primary, or the call came during the failover

        def take():
            other = clustershm.Lock("across")
            if not other.acquire(timeout=5):
                raise ManagerUnavailable("not yet")
            other.release()
            return True

        assert _until_it_works(take, timeout=40)[0] is True
    finally:
        current = registry.current()
        if current is not None:
            current.transport.shutdown()
        registry.reset()


def test_clustershm_stats_reports_the_remote_engine(remote):
    from io import StringIO

    from django.core.management import call_command

    clustershm.set("a", 1)
    with clustershm.mutex("held-now"):
        out = StringIO()
        call_command("clustershm_stats", stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "engine at" in text and "store: 1 key\n" in text, text
    assert "locks: 1 held" in text and "held-now" in text, text
    assert "lock freed when holder dies: within one lease" in text, text
