"""The dashboard in a real browser (#18): headless Chromium, driven by Selenium through
Debian's chromium-driver, against ``manage.py runcluster`` serving testproject over HTTP.

Why Selenium over the DevTools protocol by hand: chromedriver owns the browser's
start, its profile and its shutdown (quit() ends every Chromium process it made),
and gives the console log as data; a hand-made CDP client would redo that over a
websocket with its own process bookkeeping. Selenium is told where chromedriver
is and SE_OFFLINE is set, so Selenium Manager never reaches for the network.

With CI=true a missing browser, driver or Selenium fails the test instead of
skipping it (tests/helpers.skip_or_fail): .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

import django_clustershm as clustershm
from django_clustershm.registry import read_secret

from .helpers import skip_or_fail, wait_until
from .test_runcluster import ROOT, Server

pytestmark = pytest.mark.slow

#: What Chromium needs here: no sandbox as root in a container, no GPU, and none of
#: the background traffic (updates, sync, field trials) that a closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PASSWORD = "dash-board-pw"

#: A staff user in a fresh database, by a script rather than `manage.py migrate`: a
#: management command run from the command line would attach to a running cluster.
MAKE_STAFF = f"""
import django
django.setup()
from django.core.management import call_command
from django.contrib.auth import get_user_model
call_command("migrate", verbosity=0, interactive=False)
get_user_model().objects.create_user("staff", password={PASSWORD!r}, is_staff=True)
"""


def _browser_parts() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        skip_or_fail("selenium is not installed: pip install -e '.[test]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        skip_or_fail("chromium or chromedriver not found: apt-get install chromium chromium-driver")
    return chromium, driver


@pytest.fixture
def cluster_with_staff(tmp_path):
    env = {"DEMO_DB": str(tmp_path / "db.sqlite3")}
    made = subprocess.run(
        [sys.executable, "-c", MAKE_STAFF],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    server = Server(tmp_path, env=env, workers=2)
    server.argv[server.argv.index("--workers") + 1] = "2"
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    chromium, driver_path = _browser_parts()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every Chromium process it started


@pytest.fixture
def manager(cluster_with_staff):
    """This process on the cluster's Manager, attached by its socket as a cron job would be."""
    address = cluster_with_staff.manager_address()
    clustershm.configure(address, read_secret(address))
    yield clustershm.get_client()
    clustershm.configure(None)


def shown(driver, selector: str) -> str | None:
    """The exact figure (data-value) the page shows at ``selector``, read in one step
    (the refresh replaces the elements: a handle held across it would go stale)."""
    return driver.execute_script(
        "var e = document.querySelector(arguments[0]); return e ? (e.dataset.value || e.textContent) : null;",
        selector,
    )


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_dashboard_in_chromium_shows_the_managers_figures_and_follows_them(
    cluster_with_staff, browser, manager, tmp_path
):
    server = cluster_with_staff
    base = f"http://127.0.0.1:{server.port}"

    # Staff only: the browser is sent to log in first.
    browser.get(base + "/clustershm/")
    wait_until(lambda: "/accounts/login/" in browser.current_url, timeout=20, message="the login page")
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "id_username").send_keys("staff")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait_until(
        lambda: browser.current_url.endswith("/clustershm/") and shown(browser, "#namespaces") is not None,
        timeout=20,
        message="the dashboard after logging in",
    )

    # The figures are the Manager's: its pid, its workers (processes, not connections), its store.
    stats = manager.stats()
    assert shown(browser, '[data-field="manager-pid"]') == str(stats["manager_pid"]) == str(server.master)
    workers = server.workers()
    wait_until(
        lambda: shown(browser, '[data-field="workers"]') == str(len(workers)) == "2",
        timeout=20,
        message="both workers on the page",
    )
    for pid in workers:
        assert (
            browser.execute_script(
                "var r = document.querySelector('tr[data-pid=\"' + arguments[0] + '\"] .role'); return r && r.textContent;",
                str(pid),
            )
            == "worker"
        )

    # A write elsewhere shows up without reloading the page.
    before = shown(browser, 'tr[data-ns=""] [data-field="keys"]')
    manager.set("dash:written-from-the-test", "x" * 1000)
    keys = manager.stats()["store"]["keys"]
    assert str(keys) != before
    wait_until(
        lambda: shown(browser, 'tr[data-ns=""] [data-field="keys"]') == str(keys),
        timeout=20,
        message=f"the store's {keys} keys on the page",
    )
    assert shown(browser, 'tr[data-ns=""] [data-field="bytes"]') == str(manager.stats()["store"]["bytes"])

    # A lock held here, and a worker queued for it behind us: both on the page, live.
    lock = clustershm.Lock("demo:lock:dash")
    assert lock.acquire(timeout=5)
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.update(server.get("/lock/?key=dash&timeout=60", timeout=90)[1]))
    waiter.start()
    try:
        wait_until(
            lambda: shown(browser, 'tr[data-lock="demo:lock:dash"] [data-field="holder"]') == str(os.getpid()),
            timeout=20,
            message="the held lock and its holder's pid",
        )
        queue = '[data-lock-queue="demo:lock:dash"]'
        wait_until(
            lambda: any(f"pid {pid}" in (shown(browser, queue) or "") for pid in workers),
            timeout=20,
            message="the waiting worker in the lock's queue",
        )
        assert shown(browser, '[data-field="locks-held"]') == "1"
        browser.save_screenshot(str(tmp_path / "dashboard-lock-held.png"))
    finally:
        lock.release()
        waiter.join(90)
    assert waited.get("acquired") is True and waited["pid"] in workers
    wait_until(
        lambda: (
            shown(browser, '[data-field="no-locks"]') is not None and shown(browser, '[data-field="locks-held"]') == "0"
        ),
        timeout=20,
        message="the lock gone from the page",
    )
    assert "demo:lock:dash" in browser.find_element(By.ID, "locks").text  # among the longest waits

    # Reads on a phone: nothing wider than the screen (wide tables scroll in their own box).
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    browser.set_window_size(390, 844)
    wait_until(
        lambda: browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;"),
        timeout=10,
        message="no sideways scrolling at phone width",
    )
    browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 0

    errors = console_errors(browser)
    assert not errors, errors
