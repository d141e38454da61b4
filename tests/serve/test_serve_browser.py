"""`streamdit serve` in real headless Chromium (Debian's package, driven by Playwright).

The page shows frames that change over time; typing a prompt with "hard cut" bumps the epoch
the page shows; pause and start on the page hold and resume the stream; stop on the page ends
the server with exit 0. A screenshot is saved to `artifacts/serve_page.png` (or
$STREAMDIT_ARTIFACTS) for a human to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from ranks import env
from serve_proc import ServeProcess

pytestmark = pytest.mark.timeout(240)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(env().get("STREAMDIT_ARTIFACTS") or Path(__file__).resolve().parents[2] / "artifacts")


@pytest.fixture()
def page():
    assert CHROMIUM, "Debian's chromium is required (apt-get install chromium; .ci/run installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 700})
        finally:
            browser.close()


def _shown(page: Page) -> int:
    return int(page.get_attribute("#frame", "data-shown") or 0)


def _frame_src(page: Page) -> str:
    return page.get_attribute("#frame", "src") or ""


def test_page_streams_frames_and_steers_the_stream(page: Page, tmp_path: Path) -> None:
    with ServeProcess(tmp_path) as server:
        page.goto(server.page_url)
        page.wait_for_function(
            "Number(document.querySelector('#frame').dataset.shown || 0) >= 5", timeout=60_000
        )
        # frames change over time: the displayed image differs between two moments
        first = page.locator("#frame").screenshot()
        page.wait_for_function(
            f"Number(document.querySelector('#frame').dataset.shown || 0) >= {_shown(page) + 20}",
            timeout=60_000,
        )
        second = page.locator("#frame").screenshot()
        assert first != second
        expect(page.locator("#epoch")).to_have_text("0", timeout=10_000)

        page.fill("#prompt", "a lighthouse in a storm")
        page.select_option("#transition", "hard")
        page.click("#send")
        expect(page.locator("#message")).to_contain_text("/prompt", timeout=10_000)
        expect(page.locator("#epoch")).to_have_text("1", timeout=60_000)
        expect(page.locator("#current-prompt")).to_contain_text("a lighthouse in a storm")

        page.click("#pause")
        expect(page.locator("#state")).to_have_text("paused", timeout=10_000)
        page.click("#start")
        expect(page.locator("#state")).to_have_text("running", timeout=10_000)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "serve_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # a bad prompt from the page: a clear message, the stream goes on
        page.fill("#prompt", " ")
        page.click("#send")
        expect(page.locator("#message")).to_contain_text("error 422", timeout=10_000)

        page.click("#stop")
        assert server.stop() == 0, server.log()


def test_a_page_of_another_origin_cannot_steer_the_stream(page: Page, tmp_path: Path) -> None:
    """CSRF in a real browser: the operator opened the serve page (its cookie is set), then a
    page from another origin (another port of 127.0.0.1: the same *site*, so SameSite alone
    would not stop it) sends what a browser lets it send cross-origin: a no-cors text/plain
    POST and a form POST. Neither reaches the stream: no prompt pending, state unchanged."""
    import http.server
    import threading

    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    with ServeProcess(tmp_path, "--start-paused") as server:
        target = server.url
        (evil_dir / "index.html").write_text(
            f"""<html><body><form id="f" method="POST" action="{target}stop" enctype="text/plain">
            <input name='{{"prompt": "pwned", "x": "' value='"}}'></form><script>
            fetch("{target}prompt", {{method: "POST", mode: "no-cors", credentials: "include",
                headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({{prompt: "pwned"}})}})
              .finally(() => {{ document.title = "sent"; }});
            </script></body></html>"""
        )
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(evil_dir))  # noqa: E731
        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            page.goto(server.page_url)  # the operator's session: cookie set
            expect(page.locator("#frame")).to_be_attached(timeout=30_000)
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
            page.wait_for_function("document.title === 'sent'", timeout=30_000)
            page.evaluate("document.getElementById('f').submit()")
            page.wait_for_load_state()
            status = server.status()
            assert status["pending_prompt"] is None and status["prompt"] != "pwned", status
            assert status["state"] == "paused" and server.proc.poll() is None, status  # not stopped
        finally:
            evil.shutdown()
