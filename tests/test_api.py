"""The module-level API, the choice of mode, and the pinned public names."""

import logging
import os

import pytest

import django_clustershm as clustershm
from django_clustershm import registry as conf

from .helpers import fork_call, reap, wait_until


def test_public_names_are_pinned():
    assert sorted(clustershm.__all__) == sorted(
        [
            "add", "clear", "decr", "delete_many", "get", "get_many", "has", "incr", "keys", "near_stats", "ping",
            "remove", "set", "set_many", "stats", "capabilities", "touch", "get_lru", "set_lru", "remove_lru",
            "Client", "EmbeddedTransport", "Engine", "Keyspace", "Limits", "Manager", "SocketTransport",
            "configure", "connect", "get_client", "changed",
            "ArgumentTypeError", "AuthenticationFailed", "BadSignature", "Unsupported", "ClusterShmError", "IntegerOverflow", "InvalidArgument",
            "InvalidKey", "KeyNotFound",
            "KeyTooLarge", "LimitExceeded", "LockNotOwned", "LockTimeout", "ManagerUnavailable",
            "NotAnInteger", "ProtocolError", "RemoteError", "SerializationError", "StoreFull",
            "ValueTooLarge", "WouldDeadlock", "Lock", "amutex", "get_lock", "mutex", "release_lock", "Handle", "listen",
            "aadd", "aclear", "adecr", "adelete_many", "aget", "aget_many", "ahas", "aincr", "akeys", "aremove",
            "aset", "aset_many", "astats", "atouch", "AsyncLock", "AsyncClient", "AsyncKeyspace", "alisten", "cached",
            "ttl", "expire", "expire_at", "persist", "iter_keys", "delete_pattern",
            "attl", "aexpire", "aexpire_at", "apersist", "aiter_keys", "adelete_pattern",
        ]
    )  # fmt: skip
    for name in clustershm.__all__:
        assert hasattr(clustershm, name), name


def test_exception_tree():
    for name in clustershm.__all__:
        obj = getattr(clustershm, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, clustershm.ClusterShmError)
    assert issubclass(clustershm.ManagerUnavailable, ConnectionError)
    assert issubclass(clustershm.ValueTooLarge, ValueError)
    assert issubclass(clustershm.InvalidKey, ValueError)
    assert issubclass(clustershm.LockTimeout, TimeoutError)


def test_seed_operations_in_embedded_mode(caplog):
    with caplog.at_level(logging.INFO, logger="django_clustershm"):
        conf.reset()
        clustershm.set("myObj", {"name": "Tom", "age": 10})
        assert clustershm.get("myObj") == {"name": "Tom", "age": 10}
        assert clustershm.remove("myObj")
        assert clustershm.get("myObj", "gone") == "gone"
        assert clustershm.incr("hits") == 1
        assert clustershm.decr("hits") == 0
        assert clustershm.add("a", 1) and not clustershm.add("a", 2)
        assert clustershm.has("a")
        clustershm.set_many({"x": 1, "y": 2})
        assert clustershm.get_many(["x", "y"]) == {"x": 1, "y": 2}
        assert clustershm.delete_many(["x", "y"]) == 2
        assert clustershm.touch("a", 100)
        assert clustershm.keys() == ["a", "hits"] or sorted(clustershm.keys()) == ["a", "hits"]
        assert clustershm.stats()["store"]["keys"] == 2
        assert clustershm.ping()
        assert clustershm.clear() == 2
    assert isinstance(clustershm.get_client().transport, clustershm.EmbeddedTransport)
    mode_lines = [r for r in caplog.records if "embedded mode" in r.getMessage()]
    assert len(mode_lines) == 1  # said once, not on every call


def test_embedded_limits_come_from_settings(settings):
    settings.CLUSTERSHM = {"MAX_KEY_SIZE": 10, "MAX_VALUE_SIZE": 100}
    conf.reset()
    with pytest.raises(clustershm.KeyTooLarge):
        clustershm.set("k" * 11, 1)
    with pytest.raises(clustershm.ValueTooLarge):
        clustershm.set("k", b"x" * 200)


def test_configure_points_the_api_at_a_cluster(manager_process, caplog):
    with caplog.at_level(logging.INFO, logger="django_clustershm"):
        clustershm.configure(manager_process.address, manager_process.secret)
        clustershm.set("via-api", 42)
    assert isinstance(clustershm.get_client().transport, clustershm.SocketTransport)
    assert "cluster mode" in caplog.text
    # A forked child inherits the configuration in memory and shares the state.

    def child():
        assert clustershm.get("via-api") == 42
        clustershm.incr("children")

    assert [reap(fork_call(child), 10) for _ in range(3)] == [0, 0, 0]
    assert clustershm.get("children") == 3


def test_attach_by_address_with_the_secret_file(settings, tmp_path):
    manager = clustershm.Manager().start()
    try:
        settings.CLUSTERSHM = {"ADDRESS": manager.address}
        conf.reset()
        clustershm.set("from-cron", 1)
        assert clustershm.connect(manager.address).get("from-cron") == 1
        # The environment variable works as well (for a cron job's command line).
        settings.CLUSTERSHM = {}
        os.environ["CLUSTERSHM_ADDRESS"] = manager.address
        try:
            conf.reset()
            assert clustershm.get("from-cron") == 1
        finally:
            del os.environ["CLUSTERSHM_ADDRESS"]
        conf.reset()
        with pytest.raises(clustershm.ManagerUnavailable, match="cannot read the cluster secret"):
            clustershm.connect(manager.address, secret_file=str(tmp_path / "nope"))
    finally:
        conf.reset()
        manager.close()


def test_embedded_state_is_not_shared_after_fork_and_says_so(tmp_path):
    clustershm.set("k", "parent")
    log_path = tmp_path / "fork.log"
    # Installed before the fork: the child's first use of the embedded Manager
    # may come from its listener dispatcher (re-subscribing at the fork), before
    # the child's own code runs.
    handler = logging.FileHandler(log_path)
    logger = logging.getLogger("django_clustershm")
    logger.addHandler(handler)

    def child():
        assert clustershm.get("k") == "parent"  # a copy
        clustershm.set("k", "child")
        # The warning may come from the dispatcher thread: let it finish writing.
        wait_until(lambda: "not shared" in log_path.read_text(), timeout=5, message="the fork warning")

    try:
        assert reap(fork_call(child), 10) == 0
        assert clustershm.get("k") == "parent"
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = log_path.read_text()
    assert "not shared with other processes" in text
    assert f"process {os.getpid()} " not in text  # said in the child, not in the parent
