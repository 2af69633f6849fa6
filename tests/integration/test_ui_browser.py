"""
The dashboard in a real browser: headless Chromium (Debian's C{/usr/bin/chromium}, never a
downloaded one) driven by Playwright, against the proxy running the simulator.  Each test writes
screenshots of the states it reaches to its temp folder; C{docs/ui-*.png} are copies of them.

Playwright's sync API runs in a thread of its own, so the reactor keeps serving the proxy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.processes import waitUntil
from tests.support.proxy import RunningProxy, StalledClient

T = TypeVar("T")

CHROMIUM = os.environ.get("TABBYPROXY_CHROMIUM", "/usr/bin/chromium")
BROWSER_DEADLINE = 120.0
WAIT_MS = 20_000

PROFILES: dict[str, dict[str, Any]] = {
    # A load slow enough to see it starting, quick enough for a test.
    "alpha": {"model": {"model_name": "Alpha", "unload_timer": 600}, "simulator": {"load_time": 1.5}},
    "coding/beta": {"model": {"model_name": "Beta"}},
}


def _browserOrSkip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SkipTest("playwright is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        raise SkipTest(f"no Chromium at {CHROMIUM} (the README's test command installs Debian's chromium)")
    return sync_playwright


def inBrowserThread(function: Callable[[], T]) -> Deferred[T]:
    d: Deferred[T] = deferToThread(function)
    d.addTimeout(BROWSER_DEADLINE, reactor)
    return d


class DashboardTests(TestCase):
    def setUp(self) -> None:
        self.playwright = _browserOrSkip()
        self.shots = Path(self.mktemp())
        self.shots.mkdir(parents=True)

    def browse(self, url: str, scenario: Callable[[Any], None]) -> Deferred[None]:
        """
        Run C{scenario(browser)} in a thread with a fresh headless Chromium, closed after it.
        """

        def run() -> None:
            with self.playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    scenario(browser)
                finally:
                    browser.close()

        return inBrowserThread(run)

    def page(self, browser: Any, width: int = 1280, scheme: str = "light") -> Any:
        page = browser.new_page(viewport={"width": width, "height": 900}, color_scheme=scheme)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        self.addCleanup(lambda: self.assertEqual(errors, [], "the page threw"))
        return page

    async def test_loadWatchPlayUnload(self) -> None:
        """
        The models table lists the profiles; Load makes alpha go starting, then ready, with
        TabbyAPI's log lines appearing; the playground streams an answer through
        /v1/chat/completions, which shows in the request list; Unload returns alpha to stopped.
        """
        proxy = RunningProxy(self, PROFILES)

        def scenario(browser: Any) -> None:
            page = self.page(browser)
            page.goto(proxy.url + "/ui/")
            page.wait_for_selector("#connection[data-state=live]", timeout=WAIT_MS)
            ids = page.locator("#models-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.model)")
            self.assertEqual(ids, ["alpha", "coding/beta"])
            page.screenshot(path=str(self.shots / "ui-models.png"), full_page=True)

            page.click("button[aria-label='Load alpha']")
            page.wait_for_selector("tr[data-model=alpha] .state[data-state=starting]", timeout=WAIT_MS)
            page.screenshot(path=str(self.shots / "ui-starting.png"), full_page=True)
            page.wait_for_selector("tr[data-model=alpha] .state[data-state=ready]", timeout=WAIT_MS)
            page.wait_for_selector("#log-lines li[data-source=tabby]", timeout=WAIT_MS)
            self.assertIn("alpha is ready", page.inner_text("#log-lines"))

            page.select_option("#play-model", "alpha")
            page.fill("#play-message", "Say something")
            page.click("#play-send")
            page.wait_for_selector("#play-answer[data-state=done]", timeout=WAIT_MS)
            self.assertTrue(page.inner_text("#play-answer").strip())
            self.assertIn("tokens/s", page.inner_text("#play-stats"))
            page.wait_for_selector("#requests-table tbody tr", timeout=WAIT_MS)
            self.assertIn("/v1/chat/completions", page.inner_text("#requests-table tbody tr"))
            page.screenshot(path=str(self.shots / "ui-playground.png"), full_page=True)

            page.click("button[aria-label='Unload alpha']")
            page.wait_for_selector("tr[data-model=alpha] .state[data-state=stopped]", timeout=WAIT_MS)

        await self.browse(proxy.url, scenario)
        self.assertEqual(proxy.scheduler.status()["state"], "stopped")

    async def test_phoneWidthDarkMode(self) -> None:
        """
        At 375 px in dark mode the page needs no sideways scrolling, the load buttons are in
        view, and the colours are the dark ones.
        """
        proxy = RunningProxy(self, PROFILES)

        def scenario(browser: Any) -> None:
            page = self.page(browser, width=375, scheme="dark")
            page.goto(proxy.url + "/ui/")
            page.wait_for_selector("#models-table tbody tr", timeout=WAIT_MS)
            self.assertLessEqual(page.evaluate("document.documentElement.scrollWidth"), 375)
            box = page.locator("button[aria-label='Load alpha']").bounding_box()
            self.assertLessEqual(box["x"] + box["width"], 375)
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            self.assertEqual(background, "rgb(20, 20, 19)")
            page.screenshot(path=str(self.shots / "ui-phone-dark.png"), full_page=True)

        await self.browse(proxy.url, scenario)

    async def test_authAsksOnceAndHidesAdminActions(self) -> None:
        """
        With auth on, the page asks for a key: a wrong one is refused; an API key shows the models
        without load/unload and without the log, and is kept in session storage, so a reload
        asks nothing; the admin key shows the actions.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-auth")
        keys = proxy.scheduler.install.keys

        def scenario(browser: Any) -> None:
            page = self.page(browser)
            page.goto(proxy.url + "/ui/")
            page.wait_for_selector("#key-dialog[open]", timeout=WAIT_MS)
            page.fill("#key-input", "not-a-key")
            page.click("#key-submit")
            page.wait_for_selector("#key-error:not([hidden])", timeout=WAIT_MS)
            self.assertIn("refused", page.inner_text("#key-error"))
            page.screenshot(path=str(self.shots / "ui-key-refused.png"), full_page=True)

            page.fill("#key-input", keys.apiKeys[0])
            page.click("#key-submit")
            page.wait_for_selector("#connection[data-state=live]", timeout=WAIT_MS)
            self.assertFalse(page.is_visible("button[aria-label='Load alpha']"))
            self.assertFalse(page.is_visible("#log-lines"))
            self.assertTrue(page.is_visible("#logs .needs-admin"))
            self.assertEqual(page.evaluate("sessionStorage.getItem('tabbyproxy.key')"), keys.apiKeys[0])
            page.reload()
            page.wait_for_selector("#connection[data-state=live]", timeout=WAIT_MS)
            self.assertFalse(page.is_visible("#key-dialog"))

            admin = self.page(browser)
            admin.goto(proxy.url + "/ui/")
            admin.wait_for_selector("#key-dialog[open]", timeout=WAIT_MS)
            admin.fill("#key-input", keys.adminKey)
            admin.click("#key-submit")
            admin.wait_for_selector("button[aria-label='Load alpha']", state="visible", timeout=WAIT_MS)
            self.assertTrue(admin.is_visible("#log-lines"))

        await self.browse(proxy.url, scenario)


class EventStreamTests(TestCase):
    async def test_viewerThatNeverReadsHasBoundedMemory(self) -> None:
        """
        A viewer of C{/events?logs} that never reads its socket costs the proxy a bounded amount
        of memory however much happens: the connection's buffer stops growing (the viewer is
        paused) and the viewer's own queue stays capped, while the proxy keeps serving.
        """
        from twisted.logger import Logger

        from tabbyproxy.routes.ui import BATCH_SECONDS, MAX_QUEUED, EventViewer

        proxy = RunningProxy(self, PROFILES)
        stalled = await StalledClient.open(self, proxy, EventViewer, "/events?logs")
        viewer = stalled.producer
        log = Logger(namespace="tests.ui")
        line = "x" * 1000
        # One batch of these is more than the connection's buffer takes.
        for number in range(200):
            log.info("filler {number} {line}", number=number, line=line)
        await waitUntil(lambda: viewer.paused)
        # Paused, the viewer writes nothing: what happens now waits in its capped queue.
        for _ in range(4 * MAX_QUEUED):
            log.info("filler {line}", line=line)
        await deferLater(reactor, 2 * BATCH_SECONDS)
        self.assertTrue(viewer.paused)
        buffered = stalled.buffered
        # Megabytes were logged; the proxy holds at most one batch over its buffer's limit.
        self.assertLess(buffered, 64 * 1024 + MAX_QUEUED * 1200)
        self.assertLessEqual(len(viewer.queued), MAX_QUEUED)
        self.assertLess(viewer.pendingBytes, MAX_QUEUED * 1200)
        self.assertGreater(viewer.dropped, 0)
        response = await proxy.http.get(proxy.url + "/health")
        self.assertEqual(response.code, 200)
        await response.content()
