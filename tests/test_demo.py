"""The demo shows itself (#18 part 5): a styled index that links every page and
works offline, ``/whoami/`` as a page for browsers and JSON for scripts, and
worker processes counted as processes, not connections."""

from __future__ import annotations

import json
import re

import pytest
from django.core.cache import caches
from django.test import Client

from testproject.demo.views import worker_pids

#: Every page the index must link (issue #18: counter, cache_page, fragment, sessions, flags, the dashboard).
PAGES = [
    "/hit/", "/counter/", "/cincr/", "/cached/", "/fragment/", "/login/?name=tom", "/me/", "/logout/",
    "/flags/", "/whoami/", "/lock/?key=demo", "/clustershm/", "/ahit/", "/acounter/", "/alock/", "/booted/",
]  # fmt: skip


@pytest.fixture
def browser():
    return Client(HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")


def test_the_index_links_every_page_and_needs_no_network(browser):
    response = browser.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    hrefs = set(re.findall(r'href="([^"]+)"', html))
    for page in PAGES:
        assert any(href.replace("&amp;", "&").startswith(page) for href in hrefs), (page, sorted(hrefs))
    assert "<style>" in html  # styled inline...
    assert not re.search(r'(src|href)="(https?:)?//', html), "an external resource"  # ...with no CDN
    assert '<meta name="viewport"' in html  # readable on a phone


def test_the_index_says_entry_and_entries():
    caches["default"].clear()
    caches["default"].set("one", 1)
    assert re.search(r">\s*1 entry<", Client().get("/").content.decode())
    caches["default"].set("two", 2)
    assert re.search(r">\s*2 entries<", Client().get("/").content.decode())


def test_whoami_is_json_for_scripts_and_a_page_for_browsers(browser):
    for response in (Client().get("/whoami/"), browser.get("/whoami/?format=json")):
        assert response["Content-Type"] == "application/json"
        body = json.loads(response.content)
        assert {"pid", "engine", "manager_pid", "keys", "workers", "clients", "caches", "near_caches"} <= set(body)
    page = browser.get("/whoami/")
    assert page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert "this worker&#x27;s pid" in html or "this worker's pid" in html, html
    assert Client().get("/whoami/?format=html")["Content-Type"].startswith("text/html")


def test_workers_are_distinct_processes_without_the_master():
    stats = {
        "manager_pid": 10,
        "clients": [{"pid": 10}, {"pid": 12}, {"pid": 11}, {"pid": 12}, {"pid": 11}, {"pid": 12}],
    }
    assert worker_pids(stats) == [11, 12]
    assert worker_pids({"store": {}}) is None  # the Redis engine does not say
