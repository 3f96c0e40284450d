"""Open a report in Debian's headless Chromium with the network off and say what the page did.

Used by the smoke pipeline's test; also a command for any report:
``python tests/browser.py reports/all.html reports/all.png`` prints the findings as JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

VIEWPORT = {"width": 1280, "height": 900}
MISSING = ("the report's browser check needs Debian's chromium package (apt-get install chromium), "
           "found nowhere on PATH; README, Quick start")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError(MISSING)
    return path


def open_report(html: Path, screenshot: Path | None = None) -> dict:
    """Load ``html`` at 1280 px wide, offline, and return what a reader's browser would meet: every request
    beyond data URIs, console messages and page errors, each image's load state, the widest element's right
    edge, the page's height, the headings in order, the table of contents' targets and where the headline starts."""
    from playwright.sync_api import sync_playwright

    url = Path(html).resolve().as_uri()
    found = {"url": url, "requests": [], "console": [], "errors": []}
    with sync_playwright() as p:
        # no DNS for any host, and the context is offline: nothing can leave the machine
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND"])
        try:
            context = browser.new_context(viewport=VIEWPORT, offline=True)
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith("data:") else found["requests"].append(r.url))
            page.on("console", lambda m: found["console"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: found["errors"].append(str(e)))
            page.goto(url, wait_until="load")
            found.update(page.evaluate("""() => {
                const open = Array.from(document.querySelectorAll('details'));
                open.forEach(d => d.open = true);  // folded tables count too
                const right = Array.from(document.querySelectorAll('table, img, figure, pre'))
                    .map(e => Math.ceil(e.getBoundingClientRect().right));
                const out = {
                    images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                                   width: i.naturalWidth})),
                    widest: Math.max(0, ...right),
                    scroll_width: document.documentElement.scrollWidth,
                    headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent.trim()),
                    toc: Array.from(document.querySelectorAll('nav.toc a')).map(a => a.getAttribute('href')),
                    ids: Array.from(document.querySelectorAll('[id]')).map(e => '#' + e.id),
                };
                open.forEach(d => d.open = false);
                out.height = document.documentElement.scrollHeight;  // as a reader first meets it: folded
                const results = document.querySelector('h2#headline');
                out.headline_top = results ? results.getBoundingClientRect().top : null;
                return out;
            }"""))
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return found


if __name__ == "__main__":
    print(json.dumps(open_report(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None), indent=1))
