"""The live dashboard and the Prometheus metrics (#18): the Manager's figures they read,
the views' access rules, and that what they show is what ``stats()`` says.

The real-browser test against a running cluster is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import os
import re

import pytest
from django.core.cache import caches
from django.test import Client as HttpClient

import django_clustershm as clustershm
from django_clustershm.exceptions import ManagerUnavailable
from django_clustershm.server.engine import HISTORY_SECONDS, Engine
from django_clustershm.wire import frames as F

from .conftest import _module_api_on


class Clock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the Manager's figures -----------------------------------------------------------------------


def test_ops_history_counts_each_second_and_idle_seconds_as_zero():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    session = engine.open_session(pid=7)
    for _ in range(3):
        engine.dispatch(session, F.PING, [])
    clock.now = 1001.2
    engine.tick()  # second 1000 ended: 3 ops
    engine.dispatch(session, F.PING, [])
    clock.now = 1004.5  # no tick in seconds 1002 and 1003 (an idle embedded engine)
    history = engine.dispatch(session, F.STATS, [])["ops_history"]
    assert history["ops"] == [3, 1, 0, 0]
    assert engine.ops_per_second == 0  # the last whole second (1003) had none


def test_ops_history_is_bounded_however_long_the_manager_runs_or_sleeps():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    session = engine.open_session()
    for second in range(2 * HISTORY_SECONDS):
        engine.dispatch(session, F.PING, [])
        clock.now = 1000.0 + second + 1
        engine.tick()
    ops = engine.dispatch(session, F.STATS, [])["ops_history"]["ops"]
    assert len(ops) == HISTORY_SECONDS and set(ops) == {1}
    clock.now += 10**9  # a billion idle seconds: still HISTORY_SECONDS entries, made at once
    engine.tick()
    ops = engine.dispatch(session, F.STATS, [])["ops_history"]["ops"]
    assert len(ops) == HISTORY_SECONDS and ops[-1] == 0


def test_lock_figures_list_waits_in_order_and_the_longest_waits():
    clock = Clock(1000.0)
    engine = Engine(clock=clock)
    holder, first, second = (engine.open_session(pid=pid) for pid in (10, 20, 30))
    token, _fence = engine.dispatch(holder, F.LOCK_ACQUIRE, ["k", None, None], 1)
    engine.dispatch(first, F.LOCK_ACQUIRE, ["k", None, None], 2)
    clock.now += 2.0
    engine.dispatch(second, F.LOCK_ACQUIRE, ["k", None, None], 3)
    clock.now += 1.0
    [held] = engine.dispatch(holder, F.STATS, [])["locks"]["held"]
    assert (held["waiters"], held["waited"]) == ([20, 30], [3.0, 1.0])
    engine.dispatch(holder, F.LOCK_RELEASE, ["k", token])  # to 20, after 3 s
    longest = engine.dispatch(holder, F.STATS, [])["locks"]["longest_waits"]
    assert [(w["key"], w["pid"], w["waited"], w["granted"]) for w in longest] == [("k", 20, 3.0, True)]


def test_near_caches_are_listed_per_process():
    engine = Engine(clock=Clock())
    tracker, reader = engine.open_session(pid=42), engine.open_session(pid=42)
    assert engine.dispatch(tracker, F.TRACKER, [])[0] == tracker.id
    engine.dispatch(reader, F.SET, ["", "k", b"v", None])
    engine.dispatch(reader, F.TRACK_GET, ["", "k"])
    engine.dispatch(reader, F.TRACK_GET_MANY, ["", ["k", "absent"]])
    engine.dispatch(reader, F.SET, ["", "k", b"w", None])
    near = engine.dispatch(reader, F.STATS, [])["near"]
    assert (near["processes"], near["fills"]) == ([42], 2)


# -- the figures ---------------------------------------------------------------------------------


def test_processes_are_counted_by_pid_with_their_role():
    """Connections of one process are one row; a child of the Manager's process is a
    worker, the Manager's own process is the manager, anything else an attached process."""
    from django_clustershm.dashboard.figures import build

    me, parent = os.getpid(), os.getppid()
    other = next(pid for pid in (1, 2, 3) if pid not in (me, parent))  # (a runner reparented to init has parent 1)
    stats = {
        "manager_pid": parent,
        "clients": [
            {"id": 1, "pid": me, "since": 100.0, "ops": 5},
            {"id": 2, "pid": me, "since": 90.0, "ops": 7},
            {"id": 3, "pid": parent, "since": 80.0, "ops": 1},
            {"id": 4, "pid": other, "since": 95.0, "ops": 2},
        ],
        "listeners": {"subscriptions": 2, "pushed": 0, "by_pid": {str(me): 2}},
        "near": {"processes": [me], "fills": 3, "stamps": 9},
    }
    found = build(stats, {}, here=me, now=200.0)
    rows = {p["pid"]: p for p in found["processes"]}
    assert (rows[me]["connections"], rows[me]["ops"], rows[me]["since"]) == (2, 12, 90.0)
    assert (rows[me]["role"], rows[parent]["role"], rows[other]["role"]) == ("worker", "manager", "process")
    assert (rows[me]["listeners"], rows[me]["near"], rows[parent]["near"]) == (2, True, False)
    assert found["near"]["fills"] == 3
    assert found["workers"] == 1 and rows[me]["this"] and rows[me]["up"] == 110.0


def test_value_slots_reach_the_figures_and_the_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from django_clustershm.dashboard.figures import build
    from django_clustershm.dashboard.metrics import exposition

    me = os.getpid()
    stats = {
        "manager_pid": os.getppid(),
        "clients": [{"id": 1, "pid": me, "since": 100.0, "ops": 5}],
        "listeners": {"subscriptions": 0, "pushed": 0, "by_pid": {}},
        "near": {"processes": [me], "fills": 3, "stamps": 9, "slots": 2, "slot_writes": 7, "slots_freed": 1},
    }
    near = {
        "default": {
            **{"entries": 1, "bytes": 10, "hits": 5, "misses": 1, "untracked": 0, "invalidated": 0},
            **{"refreshed": 4, "declined": 3, "rests": 0, "policy": "adaptive"},
        }
    }
    found = build(stats, near, here=me, now=200.0)
    assert (found["near"]["slots"], found["near"]["slot_writes"]) == (2, 7)
    assert found["near"]["here"][0]["refreshed"] == 4
    body, _ = exposition(found)
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert _value(families, "clustershm_near_slots") == 2
    assert _value(families, "clustershm_near_slot_writes_total") == 7
    assert _value(families, "clustershm_near_refreshed_total", namespace="default", pid=str(me)) == 4
    assert _value(families, "clustershm_near_declined_total", namespace="default", pid=str(me)) == 3


# -- the views -----------------------------------------------------------------------------------


def _field(html: str, row: str, field: str) -> int:
    """The exact figure a page shows in ``field`` of the row marked ``row`` (e.g. 'data-ns="default"')."""
    match = re.search(rf"<tr {re.escape(row)}.*?data-field=\"{field}\" data-value=\"(-?\d+)\"", html, re.S)
    assert match, (row, field)
    return int(match.group(1))


@pytest.fixture
def staff(django_user_model):
    user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    browser = HttpClient()
    browser.force_login(user)
    return browser


@pytest.fixture
def someone(django_user_model):
    user = django_user_model.objects.create_user("someone", password="pw")
    browser = HttpClient()
    browser.force_login(user)
    return browser


@pytest.mark.django_db
def test_anonymous_visitors_are_sent_to_log_in_and_polls_are_refused():
    anonymous = HttpClient()
    page = anonymous.get("/clustershm/")
    assert page.status_code == 302 and page["Location"] == "/accounts/login/?next=/clustershm/"
    for path in ("/clustershm/?format=json", "/clustershm/?panels=1", "/clustershm/json/", "/clustershm/metrics/"):
        assert anonymous.get(path).status_code == 403, path  # a script or a poll gets no login form


@pytest.mark.django_db
def test_users_who_are_not_staff_get_403(someone):
    for path in ("/clustershm/", "/clustershm/?format=json", "/clustershm/json/", "/clustershm/metrics/"):
        assert someone.get(path).status_code == 403, path


@pytest.mark.django_db
def test_staff_see_the_figures_that_stats_gives(staff):
    clustershm.set("a", b"x" * 100)
    clustershm.get("a")
    clustershm.get("missing")
    caches["default"].set("page", "hello")
    with clustershm.mutex("dash:held", timeout=5):
        page = staff.get("/clustershm/")
        stats = clustershm.stats()
    assert page.status_code == 200 and page["Cache-Control"].startswith("max-age=0")
    html = page.content.decode()
    for row, space in (('data-ns=""', stats["store"]), ('data-ns="default"', stats["caches"]["default"])):
        for field in ("keys", "bytes", "hits", "misses", "expired"):
            assert _field(html, row, field) == space[field], (row, field)
    assert _field(html, 'data-ns="default"', "evictions") == stats["caches"]["default"]["evictions"]
    assert 'data-lock="dash:held"' in html and f'data-field="holder">{os.getpid()}<' in html
    assert 'id="ops-chart"' in html and "<script" in html  # the chart, inline; the refresh
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    panels = staff.get("/clustershm/?panels=1").content.decode()
    assert 'data-ns="default"' in panels and "<html" not in panels and "No lock is held" in panels


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/clustershm/json/", "/clustershm/?format=json"])
def test_the_json_is_the_figures_of_stats(staff, path):
    clustershm.set("k", 1)
    caches["default"].set("page", "hello")
    found = staff.get(path).json()
    stats = clustershm.stats()
    store = found["namespaces"][0]
    assert (store["name"], store["keys"], store["bytes"]) == ("", stats["store"]["keys"], stats["store"]["bytes"])
    assert {ns["name"] for ns in found["namespaces"][1:]} == set(stats["caches"])
    assert found["engine"] == "local" and found["capabilities"] == stats["capabilities"]
    assert found["manager"]["pid"] == stats["manager_pid"] == os.getpid()
    assert found["history"]["ops"] == stats["ops_history"]["ops"][: len(found["history"]["ops"])]


@pytest.mark.django_db
def test_the_page_says_so_when_the_engine_does_not_answer(staff, monkeypatch):
    from django_clustershm.dashboard import figures

    def down(client):
        raise ManagerUnavailable("the Manager is gone")

    monkeypatch.setattr(figures, "collect", down)
    page = staff.get("/clustershm/")
    assert page.status_code == 200 and "the Manager is gone" in page.content.decode()
    assert staff.get("/clustershm/json/").status_code == 503
    families = _metrics(staff.get("/clustershm/metrics/"))
    assert families["clustershm_up"].samples[0].value == 0


# -- metrics -------------------------------------------------------------------------------------


def _metrics(response) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def _value(families: dict, name: str, **labels) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


@pytest.mark.django_db
def test_metrics_carry_the_same_figures_per_namespace_and_per_process(staff):
    clustershm.set("a", 1)
    clustershm.get("a")
    caches["default"].set("page", "hello")
    caches["default"].get("nothing")
    with clustershm.mutex("dash:metrics", timeout=5):
        families = _metrics(staff.get("/clustershm/metrics/"))
        stats = clustershm.stats()
    assert _value(families, "clustershm_up") == 1
    assert _value(families, "clustershm_engine_info", engine="local") == 1
    for ns, space in (("", stats["store"]), ("default", stats["caches"]["default"])):
        assert _value(families, "clustershm_keys", namespace=ns) == space["keys"]
        assert _value(families, "clustershm_bytes", namespace=ns) == space["bytes"]
        assert _value(families, "clustershm_max_bytes", namespace=ns) == space["max_bytes"]
        assert _value(families, "clustershm_hits_total", namespace=ns) == space["hits"]
        assert _value(families, "clustershm_misses_total", namespace=ns) == space["misses"]
    assert _value(families, "clustershm_evictions_total", namespace="default") == 0
    assert _value(families, "clustershm_locks_held") == stats["locks"]["held_count"] == 1
    assert _value(families, "clustershm_locks_granted_total") == stats["locks"]["granted"]
    connections = sum(1 for c in stats["clients"] if c["pid"] == os.getpid())
    assert _value(families, "clustershm_process_connections", pid=str(os.getpid()), role="manager") == connections
    assert families["clustershm_ops"].type == "counter" and families["clustershm_keys"].type == "gauge"


@pytest.mark.django_db
def test_metrics_are_built_on_a_registry_of_their_own(staff):
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    _metrics(staff.get("/clustershm/metrics/"))
    _metrics(staff.get("/clustershm/metrics/"))  # again: no duplicate registration
    assert set(REGISTRY._names_to_collectors) == before


@pytest.mark.django_db
def test_metrics_open_to_a_bearer_token_or_allowed_addresses(settings):
    scraper = HttpClient()
    settings.CLUSTERSHM = {**settings.CLUSTERSHM, "METRICS": {"TOKEN": "s3cret"}}
    assert _value(_metrics(scraper.get("/clustershm/metrics/", HTTP_AUTHORIZATION="Bearer s3cret")), "clustershm_up")
    refused = scraper.get("/clustershm/metrics/", HTTP_AUTHORIZATION="Bearer wrong")
    assert refused.status_code == 401 and refused["WWW-Authenticate"].startswith("Bearer")
    assert scraper.get("/clustershm/").status_code == 302  # the token opens the metrics only
    settings.CLUSTERSHM = {**settings.CLUSTERSHM, "METRICS": {"ALLOWED_IPS": ["10.0.0.0/8"]}}
    assert scraper.get("/clustershm/metrics/", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert scraper.get("/clustershm/metrics/", REMOTE_ADDR="127.0.0.1").status_code == 403
    # A header anyone can send is not an address: only REMOTE_ADDR counts.
    forged = scraper.get("/clustershm/metrics/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="10.1.2.3")
    assert forged.status_code == 403


@pytest.mark.django_db
def test_openmetrics_when_the_scraper_asks_for_it(staff):
    response = staff.get("/clustershm/metrics/", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


# -- the Redis engine: what its stats() says, and no crash ------------------------------------------


@pytest.fixture
def on_redis(request, settings):
    # testproject keeps sessions in a cache with a near cache, which the Redis engine refuses (#16).
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    yield from _module_api_on(request, "redis")


@pytest.mark.django_db
def test_on_the_redis_engine_the_page_and_metrics_show_what_there_is(on_redis, staff):
    clustershm.set("r", 1)
    with clustershm.mutex("dash:redis", timeout=5):
        page = staff.get("/clustershm/")
        found = staff.get("/clustershm/json/").json()
        families = _metrics(staff.get("/clustershm/metrics/"))
    html = page.content.decode()
    assert page.status_code == 200 and "keeps no per-second history" in html
    assert 'data-lock="dash:redis"' in html
    assert found["engine"].startswith("redis") and found["manager"] is None and found["processes"] == []
    assert found["namespaces"][0]["keys"] >= 1 and found["locks"]["held_count"] == 1
    assert _value(families, "clustershm_locks_held") == 1
    assert _value(families, "clustershm_keys", namespace="") == found["namespaces"][0]["keys"]
    assert _value(families, "clustershm_server_connected_clients") >= 1


# -- the chart and the filters -------------------------------------------------------------------


def test_the_chart_is_right_aligned_on_a_readable_scale():
    from django_clustershm.dashboard.chart import HEIGHT, WIDTH, ops_chart

    assert ops_chart(None) is None  # the Redis engine: no history
    full = ops_chart({"ops": list(range(300))}, seconds=300)
    points = [tuple(map(float, p.split(","))) for p in full["points"].split()]
    assert len(points) == 300 and points[0] == (0.0, HEIGHT) and points[-1][0] == WIDTH
    assert full["top"] == 500 and full["peak"] == 299  # 1, 2, 5 x 10**n
    young = ops_chart({"ops": [0, 3]}, seconds=300)
    assert [float(p.split(",")[0]) for p in young["points"].split()] == [round(298 * WIDTH / 299, 1), WIDTH]
    assert young["top"] == 5


def test_filters_read_at_a_glance():
    from django_clustershm.templatetags.clustershm_dashboard import duration, guarantee, num, percent

    assert [duration(s) for s in (None, 0.25, 4.5, 45, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "\u2013", "0.25s", "4.5s", "45s", "3m 12s", "2h 05m", "3d 4h",
    ]  # fmt: skip
    assert (percent(None), percent(0.875), percent(0.004), percent(0)) == ("\u2013", "88%", "0.4%", "0%")
    assert num(1234567) == "1\u2009234\u2009567" and (guarantee(True), guarantee("at once")) == ("yes", "at once")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "expected"),
    [("", "2.0"), ("?refresh=5", "5.0"), ("?refresh=0", None), ("?refresh=inf", None), ("?refresh=x", "2.0")],
)
def test_the_refresh_period_is_a_sane_number_or_none(staff, query, expected):
    html = staff.get("/clustershm/" + query).content.decode()
    if expected is None:
        assert "<script" not in html and "not refreshing" in html
    else:
        assert f'data-refresh="{expected}"' in html and "<script" in html
