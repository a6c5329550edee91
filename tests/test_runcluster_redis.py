"""Two runcluster servers (stand-ins for two hosts) sharing one Redis (#15), over HTTP."""

from __future__ import annotations

import http.client
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from .test_runcluster import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def two_servers(tmp_path, redis_server):
    env = {"DEMO_ENGINE": redis_server.url, "DEMO_ENGINE_PREFIX": f"t{uuid.uuid4().hex[:10]}"}
    servers = []
    try:
        for _ in range(2):
            servers.append(Server(tmp_path, "--workers", "2", env=env, workers=2))
            servers[-1].argv[servers[-1].argv.index("--workers") + 1] = "2"
            servers[-1].start()
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def request(server: Server, path: str, cookie: str | None = None) -> tuple[dict, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body[:2000]
        return json.loads(body), resp.getheader("Set-Cookie")
    finally:
        conn.close()


def test_two_servers_share_counters_locks_and_sessions_through_one_redis(two_servers):
    a, b = two_servers
    for srv in (a, b):
        log = srv.log()
        assert "no Manager in the master" in log, log
        assert "lock freed when holder dies: within one lease" in log, log
        assert "the state is on the redis (standalone) engine" in log, log

    def hit(args):
        srv, path = args
        return request(srv, path)[0]

    per_server = 60
    for path in ("/counter/", "/cincr/"):  # a read-modify-write under mutex; Django's cache.incr
        jobs = [(a, path), (b, path)] * per_server
        with ThreadPoolExecutor(16) as pool:
            counts = [body["count"] for body in pool.map(hit, jobs)]
        assert sorted(counts) == list(range(1, 2 * per_server + 1)), path  # exact: no lost or repeated update
    pids = {body["pid"] for body in (hit((a, "/whoami/")), hit((b, "/whoami/")))}
    assert len(pids) == 2

    user = f"user-{uuid.uuid4().hex[:6]}"
    body, set_cookie = request(a, f"/login/?name={user}")
    assert body["user"] == user and set_cookie
    cookie = set_cookie.split(";", 1)[0]
    assert request(b, "/me/", cookie)[0]["user"] == user  # a session made on one host, read on the other
    request(b, "/logout/", cookie)
    assert request(a, "/me/", cookie)[0]["user"] is None


@pytest.fixture
def two_strict_servers(tmp_path, redis_server):
    env = {
        "DEMO_ENGINE": redis_server.url,
        "DEMO_ENGINE_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "DEMO_NEAR_CONSISTENCY": "strict",
    }
    servers = []
    try:
        for _ in range(2):
            servers.append(Server(tmp_path, "--workers", "2", env=env, workers=2))
            servers[-1].start()
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def test_a_strict_near_cache_never_reads_stale_across_two_servers(two_strict_servers):
    """The stale-read hunter over HTTP (#16): a writer sets increasing values
    through one server and notes each one once its response came back; readers
    on both servers note the last completed write, then read through their
    workers' near caches: never an older value."""
    import threading
    import time

    a, b = two_strict_servers
    request(a, "/near/?key=hunted&set=0")
    done = [0]
    stale: list[tuple[int, int]] = []
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            request(a if n % 2 else b, f"/near/?key=hunted&set={n}")
            done[0] = n

    def reader(srv):
        hits = 0
        while not stop.is_set():
            floor = done[0]
            body = request(srv, "/near/?key=hunted")[0]
            if int(body["value"]) < floor:
                stale.append((int(body["value"]), floor))
            hits = max(hits, body["near_hits"])
        return hits

    with ThreadPoolExecutor(5) as pool:
        w = pool.submit(writer)
        readers = [pool.submit(reader, srv) for srv in (a, b, a, b)]
        time.sleep(3.0)  # the hunt's length, not a wait for anything
        stop.set()
        w.result()
        hits = [r.result() for r in readers]
    assert not stale, f"{len(stale)} stale reads, e.g. {stale[:3]}"
    assert done[0] > 20 and max(hits) > 20, (done[0], hits)  # writes happened, and copies answered
