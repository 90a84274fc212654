"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright) against the live
swarm: the node rows appear with their spans, and a live session shows up while a request runs."""

import shutil
import threading

import httpx
import pytest

from duskpool.weights.catalog import BUNDLED_NAME

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"])
        yield browser.new_page(viewport={"width": 1400, "height": 900})
        browser.close()


def test_dashboard_shows_the_nodes_and_live_sessions(page, base_url, gateway, tmp_path):
    page.goto(base_url + "/")
    rows = page.locator("#nodes tr.node")
    rows.nth(len(gateway.route) - 1).wait_for(timeout=15_000)
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-span") for i in range(3)] == [
        f"{s.start}-{s.stop}" for s in gateway.route]
    assert [rows.nth(i).locator("td.span").inner_text() for i in range(3)] == ["[1, 10)", "[10, 19)", "[19, 29)"]
    page.locator("#nodes td.health-ok").nth(2).wait_for(timeout=10_000)  # Info answered by all three
    assert page.locator("#placement div").count() == 5  # gateway prefix, 3 nodes, gateway suffix
    assert page.locator("#live").get_attribute("class") == "on"  # the event stream is connected

    body = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "Write a long poem."}],
            "max_tokens": 120, "temperature": 0}
    request = threading.Thread(target=httpx.post, args=(f"{base_url}/v1/chat/completions",),
                               kwargs={"json": body, "timeout": 60})
    request.start()
    page.locator("#sessions tr.session").first.wait_for(timeout=15_000)  # pushed live, no reload
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    request.join(60)
    page.locator("#sessions td.empty").wait_for(timeout=15_000)
    assert int(page.locator("#t-requests").inner_text()) >= 1
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'dashboard.png'}")
