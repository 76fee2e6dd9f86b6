"""A real headless Chromium for the web interface's end-to-end tests, driven by Playwright.

The browser is Debian's ``chromium`` package (``make install`` puts it there): Playwright
never downloads one. Load these fixtures in a test module with
``pytest_plugins = ["support.browser"]``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from .server import InProcessServer, PostierServer, ServerProcess, in_process

CHROMIUM = os.environ.get("POSTIER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PASSWORDS = {name: "motdepasse-" + name for name in ("admin", "alice", "bob")}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped, not session-scoped: Playwright's synchronous API keeps an event loop
    running in the test thread while it is open, which later asyncio tests cannot share."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make install` (it installs Debian's "
                    "chromium package)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Web:
    """Browser contexts (one per person) on one running server."""

    def __init__(self, browser: Any, url: str) -> None:
        self.browser = browser
        self.url = url
        self.contexts: list[Any] = []

    def page(self, lang: str = "fr-FR", width: int = 1280, height: int = 900) -> Any:
        context = self.browser.new_context(
            base_url=self.url, locale=lang, viewport={"width": width, "height": height},
            accept_downloads=True,
        )
        context.set_default_timeout(10_000)
        self.contexts.append(context)
        return context.new_page()

    def sign_in(self, user: str = "admin", lang: str = "fr-FR", **kw: Any) -> Any:
        page = self.page(lang, **kw)
        page.goto("/login")
        page.fill("#f-username", user)
        page.fill("#f-password", PASSWORDS[user])
        page.click("button[type=submit]:has-text('Se connecter'), "
                   "button[type=submit]:has-text('Sign in')")
        page.wait_for_url(re.compile(r"/(queue|mine)"))
        return page

    @staticmethod
    def screenshot(page: Any, name: str) -> None:
        """Keep a picture of the page for the user guide (docs/screenshots/NAME.png) when
        asked to (POSTIER_SCREENSHOTS=1), so an ordinary test run leaves the tree clean;
        the page is rendered either way, so a page that cannot be drawn still fails."""
        png = page.screenshot(full_page=True)
        assert png.startswith(b"\x89PNG"), f"no picture of the {name} page"
        if os.environ.get("POSTIER_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(png)

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def web_server(server_factory: Any) -> PostierServer:
    """Like the ``server`` fixture, for tests that drive a browser."""
    s: PostierServer = server_factory().start()
    return s


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    """One server for a module's tests that leave nothing in the way of the others; in the
    test process when the module is marked ``in_process``."""
    kind = InProcessServer if in_process(request) else ServerProcess
    s = kind(tmp_path_factory.mktemp("web") / "data")
    s.provision()
    yield s.start()
    s.stop()


@pytest.fixture
def shared_web(browser: Any, shared_server: ServerProcess) -> Iterator[Web]:
    w = Web(browser, shared_server.url)
    yield w
    w.close()


@pytest.fixture
def web(browser: Any, web_server: Any) -> Iterator[Web]:
    """Browser contexts on the ``web_server`` fixture's running server."""
    w = Web(browser, web_server.url)
    yield w
    w.close()
