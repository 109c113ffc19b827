"""Open an HTML file in headless Chromium and report what a reader would get.

Driven by Playwright for Python with the system's Chromium (Debian package ``chromium``,
``/usr/bin/chromium``): no browser download, and Playwright collects the console, page errors and
requests reliably. Each call starts a fresh browser with its own temporary profile, offline flags
(the network is closed: without them Chromium keeps trying to reach its update and sync services)
and the flags a root user needs.

    from _browser import render, unavailable
    result = render("RUN/report/index.html", "shot.png")
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
         "--mute-audio"]

# For every <img>: whether it loaded and decoded, and its pixel size.
_IMAGES_JS = """async () => Promise.all([...document.images].map(async (img) => {
    let decoded = true;
    try { await img.decode(); } catch (e) { decoded = false; }
    return {src: img.currentSrc.slice(0, 48), alt: img.alt, complete: img.complete, decoded: decoded,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight};
}))"""
_SECTIONS_JS = "() => [...document.querySelectorAll('section[id]')].map(s => s.id)"


def unavailable() -> str | None:
    """Why :func:`render` cannot run here (None when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the Python package playwright is not installed (pip install playwright)"
    return None


def render(html_path, screenshot_path, *, width: int = 1200, height: int = 900, timeout_s: float = 60.0) -> dict:
    """Load ``html_path`` (a local file) in headless Chromium, wait for it to load, take a
    full-page screenshot into ``screenshot_path`` and return::

        {"console":  [{"type", "text"}, ...]   every console message,
         "errors":   [str, ...]                console errors and uncaught page exceptions,
         "requests": [url, ...]                what the page fetched besides itself and data: URIs,
         "sections": [id, ...]                 the ids of its <section> elements, in order,
         "images":   [{"src", "alt", "complete", "decoded", "naturalWidth", "naturalHeight"}, ...],
         "title":    str, "screenshot": str}
    """
    from playwright.sync_api import sync_playwright

    page_url = Path(html_path).resolve().as_uri()
    console, errors, requests = [], [], []
    profile = tempfile.mkdtemp(prefix="i2x-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=FLAGS,
                viewport={"width": width, "height": height}, timeout=timeout_s * 1000)
            try:
                page = context.new_page()
                page.on("console", lambda m: console.append({"type": m.type, "text": m.text}))
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(page_url, wait_until="load", timeout=timeout_s * 1000)
                images = page.evaluate(_IMAGES_JS)
                sections = page.evaluate(_SECTIONS_JS)
                title = page.title()
                page.screenshot(path=str(screenshot_path), full_page=True, timeout=timeout_s * 1000)
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    errors = [f"console error: {m['text']}" for m in console if m["type"] == "error"] + errors
    fetched = [u for u in requests if u != page_url and not u.startswith("data:")]
    return {"console": console, "errors": errors, "requests": fetched, "sections": sections, "images": images,
            "title": title, "screenshot": str(screenshot_path)}
