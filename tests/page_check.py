"""Render a local HTML page in headless Chromium: every broken image or link on it, and a full-page screenshot.

Playwright drives the system's Chromium (Debian's `chromium`, .ci/browser-up installs it), never a browser of its own:
`playwright install` is not needed. A broken target is a local file the page shows or links to that is not there:
  - an <img> that finished loading with no picture (complete, naturalWidth 0): a missing or unreadable file;
  - a request the page made that failed: an image, a stylesheet, a script, a font (also from CSS);
  - an <a href> or <link href> to a local file (file://) that does not exist.
Each is reported once, as its path relative to the page's folder ("grid.png", "run/index.html", "../x.csv").
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from playwright.sync_api import Browser, sync_playwright

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
GET_A_BROWSER = "run .ci/browser-up as root, or apt install chromium"

# After the load event: images that loaded no picture, and every link's resolved address.
_INSPECT = """() => ({
    images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.currentSrc || i.src),
    links: Array.from(document.querySelectorAll('a[href], link[href]')).map(a => a.href),
})"""


def find_browser() -> str | None:
    """The first Chromium on PATH, or None."""
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _local_path(url: str) -> Path | None:
    """The file a file:// address names, without its #fragment or ?query; None for any other address."""
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def _relative(url: str, folder: Path) -> str:
    path = _local_path(url)
    return os.path.relpath(path, folder).replace(os.sep, "/") if path is not None else url


class PageChecker:
    """One headless Chromium for many pages (starting it is the slow part); a context manager."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900):
        executable = executable or find_browser()
        if executable is None:
            raise FileNotFoundError(f"no Chromium on PATH ({', '.join(BROWSER_NAMES)}): {GET_A_BROWSER}")
        self._playwright = sync_playwright().start()
        try:
            self.browser: Browser = self._playwright.chromium.launch(executable_path=executable, headless=True)
        except BaseException:
            self._playwright.stop()
            raise
        self.viewport = {"width": width, "height": height}

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()

    def __enter__(self) -> PageChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render_page(self, html_path: str | Path, screenshot_path: str | Path) -> list[str]:
        """Load html_path, wait for it and everything on it, save a full-page PNG; return its broken targets, sorted."""
        html_path = Path(html_path).resolve()
        if not html_path.is_file():
            raise FileNotFoundError(f"{html_path} does not exist")
        folder = html_path.parent
        broken: set[str] = set()
        page = self.browser.new_page(viewport=self.viewport)
        try:
            def on_response(response) -> None:
                if response.status >= 400:
                    broken.add(_relative(response.url, folder))

            page.on("requestfailed", lambda request: broken.add(_relative(request.url, folder)))
            page.on("response", on_response)
            page.goto(html_path.as_uri(), wait_until="load")  # every picture and stylesheet loaded or failed
            found = page.evaluate(_INSPECT)
            broken.update(_relative(url, folder) for url in found["images"])
            for url in found["links"]:
                target = _local_path(url)
                if target is not None and not target.exists():
                    broken.add(_relative(url, folder))
            Path(screenshot_path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot_path), full_page=True)
        finally:
            page.close()
        return sorted(broken)


def render_page(html_path: str | Path, screenshot_path: str | Path, checker: PageChecker | None = None) -> list[str]:
    """PageChecker.render_page with a browser of its own when none is given (slower: one start per call)."""
    if checker is not None:
        return checker.render_page(html_path, screenshot_path)
    with PageChecker() as own:
        return own.render_page(html_path, screenshot_path)
