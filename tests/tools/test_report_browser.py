"""`jetmoe debug compare --html` in a real browser: headless Chromium (Debian's, driven by Playwright; `make
setup-browser`, which `make test` runs) opens the report offline, finds the first divergence in the DOM, clicks a
filter and saves a screenshot; the test fails if the page asks for anything but its own file."""

import os
import pathlib
import re
import shutil

import pytest

from jetmoe.command import main
from notebooks import zoo


def browser_or_skip():
    """Playwright's sync API and Debian's chromium; a skip naming `make setup-browser` outside CI, a failure in it."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or chromium is None:
        message = "the browser test needs Debian's chromium and playwright: make setup-browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright, chromium


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    _, argv = zoo.dump("pads", folder / "port.safetensors")
    assert main(["debug", "compare", *argv, "--html", str(folder / "report.html")]) == 1
    return folder / "report.html"


def open_offline(path, act):
    """Open `path` in headless chromium with the network off; act(page) runs on it. Returns every URL the page
    requested (its own file included)."""
    sync_playwright, chromium = browser_or_skip()
    requested = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(pathlib.Path(path).as_uri())
            act(page)
        finally:
            browser.close()
    return requested


def test_the_report_works_offline_in_chromium(report, tmp_path):
    seen = {}

    def act(page):
        first = page.locator("#first-divergence")
        seen["first"] = first.get_attribute("data-name")
        seen["verdict line"] = page.locator("#verdict-line").inner_text()
        seen["labels"] = page.locator("#error-plot text.label").all_text_contents()
        seen["tolerance"] = page.locator("#tolerance").count()
        seen["routers"] = page.locator("#routing-map rect").count()
        page.click("button[data-filter=introduced]")
        visible = page.locator("#verdicts tbody tr:visible")
        seen["shown"] = page.locator("#shown").inner_text()
        seen["visible"] = {visible.nth(i).get_attribute("data-verdict") for i in range(visible.count())}
        seen["visible names"] = [visible.nth(i).get_attribute("data-name") for i in range(visible.count())]
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    requested = open_offline(report, act)
    assert seen["first"] == "layers.0.attention.probs"
    assert "first divergence: layers.0.attention.probs" in seen["verdict line"]
    probs = [f"layers.{i}.attention.probs" for i in range(6)]
    assert seen["labels"] == probs and seen["tolerance"] == 1
    assert seen["routers"] == 12 * 22  # 12 routers x 22 tokens
    assert seen["visible"] == {"introduced"} and seen["visible names"] == probs and seen["shown"] == "6"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert requested == [pathlib.Path(report).as_uri()]


def test_the_report_is_one_file_that_names_no_address(report):
    page = report.read_text()
    addresses = re.findall(r"(?:https?:|//)[^\s\"'<>]*", page)
    assert set(addresses) == {"http://www.w3.org/2000/svg"}  # SVG's namespace, a name that is never fetched
    assert "<link" not in page and " src=" not in page and 'id="first-divergence"' in page


def test_a_request_over_the_network_is_seen(report, tmp_path):
    """The check above can fail: the same report with one remote image requests it."""
    leaky = tmp_path / "leaky.html"
    leaky.write_text(report.read_text().replace("<body>", '<body><img src="https://example.invalid/x.png">', 1))
    requested = open_offline(leaky, lambda page: None)
    assert "https://example.invalid/x.png" in requested
