"""The report in a real headless browser (Debian's chromium).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4,
NUL-terminated JSON), which needs no network port and no Python package: the page is loaded from a file://
URL, every console message, uncaught exception and log entry (failed resource loads included) is collected,
the live DOM is queried, and a full-page screenshot is written.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_report import make_run_dir

from finegrain.report import build_report

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1280,1600",
]
# Events that mean the page reported a problem. The report has no script, so any console call counts.
PROBLEM_EVENTS = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")


def find_chromium() -> str | None:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("FINEGRAIN_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "FINEGRAIN_REQUIRE_BROWSER=1 but chromium was not found (looked for `chromium` on PATH and "
                "/usr/bin/chromium): install it with `apt-get install chromium`"
            )
        pytest.skip("chromium not found; install it with `apt-get install chromium` to run browser tests")
    return path


class Page:
    """One headless chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, chromium: str, user_data_dir: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():
            # In the child, between fork and exec: put the browser's ends on fds 3 and 4. Both are first copied
            # above 10 (close-on-exec), so that placing one cannot overwrite the other; the dup2 copies are
            # inheritable, every other descriptor of ours is close-on-exec (PEP 446), hence close_fds=False.
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        # stderr goes to a file: chromium logs a lot (D-Bus, GPU) and an unread pipe could fill and stall it.
        user_data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = user_data_dir / "chromium-stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                close_fds=False,
                preexec_fn=wire_fds,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            attached = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})
            self.session = attached["sessionId"]
            for domain in ("Log", "Runtime", "Page"):
                self.call(f"{domain}.enable", session=True)
        except BaseException:
            self.close()
            raise

    def _send(self, method: str, params: dict | None, session: bool) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _wait_for(self, predicate) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer within the timeout")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    stderr = self.stderr_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"chromium closed the DevTools pipe; its stderr ends with:\n{stderr}")
                self._buffer += chunk

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        sent = self._send(method, params, session)
        reply = self._wait_for(lambda m: m.get("id") == sent)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def load(self, url: str) -> None:
        self._send("Page.navigate", {"url": url}, session=True)
        self._wait_for(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True
        )
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True
        )
        path.write_bytes(base64.b64decode(data["data"]))

    def problems(self) -> list[dict]:
        return [e for e in self.events if e.get("method") in PROBLEM_EVENTS]

    def close(self) -> None:
        try:
            self._send("Browser.close", None, session=False)
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture
def page(chromium, tmp_path):
    p = Page(chromium, tmp_path / "chromium-profile")
    yield p
    p.close()


def test_report_loads_without_errors_and_shows_plots_and_heatmaps(page, tmp_path):
    root = tmp_path / "runs"
    runs = [
        make_run_dir(root, "dpo", "dpo", 3.4, 1.9, steps=20),
        make_run_dir(root, "treg", "treg", 2.1, 2.0, steps=20),
    ]
    report = build_report(runs, tmp_path / "report.html", title="browser check")
    page.load(report.resolve().as_uri())
    dom = page.evaluate(
        """JSON.stringify({
        heatmaps: document.querySelectorAll('div.heatmap').length,
        rows: document.querySelectorAll('div.heatmap-row').length,
        plots: document.querySelectorAll('figure.plot img').length,
        decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
        images: document.images.length,
        scripts: document.scripts.length,
        tables: ['metrics-table', 'token-credit-table'].filter(id => document.getElementById(id)).length,
        literal: [...document.querySelectorAll('span.tok')].filter(s => s.textContent === '<script>').length,
        hover: document.querySelector('span.tok').title,
    })"""
    )
    dom = json.loads(dom)
    assert page.problems() == []
    assert dom["heatmaps"] == 4 and dom["rows"] == 2 * (
        2 + 3
    )  # per run: example 1 has 2 sources, example 2 has 3
    assert dom["plots"] == 2 and dom["images"] == 2 and dom["decoded"] == 2
    assert dom["tables"] == 2 and dom["scripts"] == 0
    assert dom["literal"] == 2 * 2  # the token "<script>" shows as text in 2 rows of 2 runs
    assert dom["hover"] == "truth | 'it' = +0.0000"

    shot = tmp_path / "report.png"
    page.screenshot(shot)
    assert shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    for rgb in ((178, 24, 43), (33, 102, 172)):
        assert (pixels == rgb).all(axis=-1).any(), rgb  # full red and full blue heatmap tokens are on screen


def test_problem_detection_is_not_vacuous(page, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="missing.png"></body></html>')
    page.load(bad.resolve().as_uri())
    page.evaluate("document.images.length")  # a round trip, so pending log events have arrived
    assert any("ERR_FILE_NOT_FOUND" in json.dumps(e) for e in page.problems())
