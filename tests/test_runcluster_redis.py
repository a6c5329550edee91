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
