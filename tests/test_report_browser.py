"""The report renders in a real browser: headless Debian Chromium driven by Playwright.

Needs `apt-get install chromium` and `pip install playwright` (Playwright drives the system
Chromium; no `playwright install`). Skipped only when /usr/bin/chromium is missing.
Leaves test-artifacts/report.png (full page) and report-top.png (first screen) in the repo.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from reports.html import write_report
from report_fixtures import make_experiment

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RENDERED = """n => {
    const plots = document.querySelectorAll('.js-plotly-plot');
    return plots.length === n && Array.from(plots).every(p => p.querySelector('.main-svg'));
}"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    exp = make_experiment(tmp_path_factory.mktemp("browser"), 60, seed=2, n_failed=3, n_running=2, finished=False)
    return write_report(exp)


def test_report_renders_every_figure_without_errors(report):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (and pip install playwright)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (it drives /usr/bin/chromium)")

    figures = report.read_text().count('class="plotly-graph-div"')
    assert figures == 6
    problems, remote = [], []
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=FLAGS,
                                                       headless=True, viewport={"width": 1400, "height": 900})
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:", "blob:"))
                    else None)
            page.goto(report.as_uri(), wait_until="load", timeout=60_000)
            page.wait_for_function(RENDERED, arg=figures, timeout=60_000)
            page.wait_for_timeout(1000)  # let the WebGL figures (3-D, parallel coordinates) draw
            counts = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'),
                                                   p => p.querySelectorAll('.main-svg').length)""")
            gl = page.evaluate("() => document.querySelectorAll('.js-plotly-plot canvas').length")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report-top.png"))
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(counts) == figures and all(c >= 1 for c in counts), counts
    assert gl >= 2, "the 3-D scatter and parallel coordinates draw on canvases"
    assert problems == []
    assert remote == [], "the report must fetch nothing"
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
