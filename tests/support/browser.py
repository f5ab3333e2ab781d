"""A real browser for the dashboard tests: Debian's Chromium driven by Playwright (it cannot download its own
browser here), screenshots saved as test artifacts, and a TCP proxy that can cut a page's connections.

Screenshots go to ``$WARLOCK_TEST_ARTIFACTS/screenshots`` or, without that variable, to
``<repo>/.artifacts/screenshots`` (gitignored), one PNG per test named after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REPO = Path(__file__).resolve().parents[2]


def screenshot_dir() -> Path:
    """Where the tests' screenshots go (created)."""
    root = os.environ.get("WARLOCK_TEST_ARTIFACTS")
    path = Path(root) / "screenshots" if root else REPO / ".artifacts" / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save the page (`full_page`: all of it, else the viewport) as ``<name>.png`` in `screenshot_dir`."""
    path = screenshot_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120] + ".png")
    await page.screenshot(path=str(path), full_page=full_page)
    return path


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium (closed after)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A page with what it reported: console errors, uncaught exceptions, WebSockets it opened."""

    page: Page
    errors: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)


async def open_page(browser: Browser, url: str, *, viewport_height: int = 900) -> Watched:
    """A new page (own context: empty sessionStorage) at `url`, recording errors and sockets."""
    context = await browser.new_context(viewport={"width": 1400, "height": viewport_height})
    page = await context.new_page()
    watched = Watched(page)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            watched.errors.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: watched.errors.append(f"uncaught: {exc}"))
    page.on("websocket", lambda ws: watched.sockets.append(ws.url))
    await page.goto(url)
    return watched


async def log_in(page: Page, key: str) -> None:
    """Type `key` in the login form and submit it."""
    await page.fill("#api-key", key)
    await page.click("#login-submit")


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 to `target`: `cut` closes every connection and refuses new ones (the port
    stays bound but stops accepting: a new connection is reset) until `resume`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()
        self.open = True

    async def start(self) -> None:
        """Listen on a free port (kept across cut/resume)."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The proxy's http URL."""
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links.difference_update((writer, up_writer))

    def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        self.open = False
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    def resume(self) -> None:
        """Accept and forward connections again."""
        self.open = True

    async def close(self) -> None:
        """Stop listening and reset what is open."""
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
