"""pp web: the status page, served by a real ``pp web`` process from a real store, read
over HTTP and in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium), which must see the page change when intent does, without a reload."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _missing
from preparer_support import free_port

from intent import keys
from intent.cli import operator as op
from intent.model import AgentStatus, Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
PP_BIN = REPO / ".venv" / "bin" / "pp"
A, B = "a" * 64, "b" * 64
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def report(
    store: IntentStore, node: str, agent: str, status: str, version: str, **kw: object
) -> None:
    fields: dict[str, object] = {"app": "web", **kw}
    store.write_reality(
        Reality(node=node, agent=agent, status=status, version=version, **fields)  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[IntentStore]:
    """App web, cluster prod on n1..n3 (n1 converged, n2 failing with a hostile health
    output, n3 waiting), plus an app api whose preparer is held on n9."""
    s = IntentStore(SqliteStore(tmp_path / "intent.db"))
    s.ensure_identity("tester")
    for key, value in (
        (keys.config("web", "prod"), {"versions": {"1": {"state": "active", "sha256": A}}}),
        (keys.deploy_config("web", "prod"), {"basedir": "/srv/web"}),
        (keys.config("api", "prod"), {"versions": {"7": {"state": "active", "sha256": B}}}),
        (keys.deploy_config("api", "prod"), {"basedir": "/srv/api"}),
    ):
        op.update(
            s, key, lambda _old, v=value: v, app=key.split("/")[1], action="apply", who="tester"
        )
    for node in ("n1", "n2", "n3"):
        s.put_json(keys.node_app(node, "web"), {"cluster": "prod"})
    s.put_json(keys.node_app("n9", "api"), {"cluster": "prod"})
    for agent in ("preparer", "setlive"):
        report(s, "n1", agent, "converged", "1")
    report(s, "n2", "preparer", "converged", "1")
    report(s, "n2", "setlive", "error", "1", error=f"1 is unhealthy: {HOSTILE}")
    report(s, "n9", "setlive", "converged", "7", app="api")
    s.write_agent_status(
        AgentStatus(node="n9", agent="preparer", state="held", reason="store replaced")
    )
    yield s
    s.close()


@pytest.fixture
def server(store: IntentStore, tmp_path: Path) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of ``pp web`` over that store; stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [str(PP_BIN), "--store", f"sqlite://{tmp_path / 'intent.db'}", "web",
         "--listen", str(port), "--refresh", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        assert first == f"pp web: serving http://127.0.0.1:{port}/ (read-only; Ctrl-C stops it)\n"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read().decode()


def test_the_page_lists_apps_clusters_and_nodes_with_state_and_escapes_store_values(
    server: str,
) -> None:
    status, headers, body = get(server + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert '<tr class="node converged" data-node="n1">' in body
    assert '<tr class="node failed" data-node="n2">' in body
    assert '<tr class="node converging" data-node="n3">' in body
    assert '<tr class="node held" data-node="n9">' in body
    assert "setlive: 1 is unhealthy: &lt;script&gt;window.pwned = 1&lt;/script&gt;&lt;img" in body
    assert "<script>window" not in body and "<img" not in body
    assert body.count("<script") == 1  # the page's own, from /static/page.js


def test_the_app_page_holds_its_audit_trail_and_unknown_pages_are_404(server: str) -> None:
    status, _, body = get(server + "/app/web")
    assert status == 200
    assert "<h2>History</h2>" in body and "clusters/web/prod/config" in body
    assert 'data-node="n9"' not in body  # api's node is not web's
    assert get(server + "/app/..%2f..%2fetc")[0] == 404
    assert get(server + "/nothing")[0] == 404


def test_the_page_is_read_only(server: str) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        request = urllib.request.Request(server + "/", data=b"x", method=method)
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            with exc:
                assert exc.code == 405 and exc.headers["Allow"] == "GET, HEAD"
        else:
            pytest.fail(f"{method} was accepted")


def test_a_bad_listen_address_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(PP_BIN), "--store", f"sqlite://{tmp_path}/x.db", "web", "--listen", "x:y"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "pp: error: --listen 'x:y': give PORT or ADDR:PORT with a port from 1 to 65535\n"
    )


# -- in a real browser ------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing(
            "no headless browser: apt-get install chromium chromium-driver (scripts/setup --test)",
            "PP_REQUIRE_BROWSER",
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    # Selenium Manager would try to download a driver: the machine has no network.
    service = Service(executable_path=str(driver), log_output=str(tmp_path / "chromedriver.log"))
    os.environ.setdefault("SE_OFFLINE", "true")
    driver_ = webdriver.Chrome(options=options, service=service)
    try:
        yield driver_
    finally:
        driver_.quit()


SNAPSHOT = """
const states = {};
for (const row of document.querySelectorAll("tr.node")) {
  states[row.dataset.node] = row.querySelector("td.state").textContent;
}
const n1 = document.querySelector('tr[data-node="n1"] td.state');
const n2 = document.querySelector('tr[data-node="n2"] td.message');
return {
  states: states,
  message: n2 ? n2.textContent : null,
  colour: n1 ? getComputedStyle(n1).backgroundColor : null,
  desired: Array.from(document.querySelectorAll("span.desired"), d => d.textContent),
};
"""


def test_the_page_in_a_browser_updates_itself_when_intent_changes(
    server: str, store: IntentStore, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    browser.get(server + "/")
    # The page replaces its rows as it updates itself: read them in one script, so a
    # refresh between two reads cannot leave a stale element behind.
    page = browser.execute_script(SNAPSHOT)
    assert page["states"] == {"n1": "converged", "n2": "failed", "n3": "converging", "n9": "held"}
    assert page["message"] == f"setlive: 1 is unhealthy: {HOSTILE}"  # shown as text
    assert page["colour"] == "rgb(212, 245, 212)"
    assert browser.execute_script("return window.pwned === undefined")
    # A mark in this page's JavaScript state: a reload would lose it.
    browser.execute_script("window.sameLoad = 'yes'")

    op.update(
        store,
        keys.config("web", "prod"),
        lambda old: op.dump(op.deployed(op.parse_config(old, "k"), "2", B, None, "k")),
        app="web",
        action="deploy",
        who="tester",
    )
    for agent in ("preparer", "setlive"):
        for node in ("n1", "n2", "n3"):
            report(store, node, agent, "converged", "2")

    def updated(driver: WebDriver) -> bool:
        page = driver.execute_script(SNAPSHOT)
        states = list(page["states"].values())
        return "2" in page["desired"] and states.count("converged") == 3

    WebDriverWait(browser, 20, poll_frequency=0.2).until(updated)
    assert browser.execute_script("return window.sameLoad") == "yes"
    assert "web / prod: desired 2, 3/3 converged" in browser.find_element(By.ID, "fleet").text
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    print(f"status page screenshot: {shot}")
