"""Open every page of the built site in headless Chromium and fail on what a reader would meet.

Usage::

    mkdocs build --strict --site-dir /tmp/site
    python docs/scripts/browser_check.py /tmp/site --screenshots /tmp/shots

The site folder is served on 127.0.0.1 (a free port) by this script; ``--url`` checks a site
served elsewhere instead. Chromium (Debian's ``chromium`` package) is driven through the DevTools
protocol over a pipe (``--remote-debugging-pipe``), so nothing beyond the standard library is
needed. A page fails on:

* a console error, an uncaught exception or a failed request (the log's ``error`` entries);
* raw TeX in the rendered text outside code (``\\(``, ``\\[``, ``\\frac``, ``\\begin``, ``$$``),
  math that MathJax did not typeset or drew blank, or a TeX error MathJax reports;
* an ``<img>`` that did not load (``naturalWidth == 0``);
* an image the site ships under ``results/`` that the page names in its text but does not show.

Code blocks and tables wider than their column are reported as warnings (the reader scrolls).
Full-page screenshots of the key pages (``--shots``, default home, concepts, metrics,
benchmarks, API) are written to ``--screenshots`` (default ``$DOCS_SCREENSHOTS``, else
``$TMPDIR/ess-po-docs-screenshots``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]
WIDTH, HEIGHT = 1280, 900
SHOT_TILE = 4000  # screenshot tile height: a long page comes in readable pieces
KEY_PAGES = ["", "concepts/", "metrics/", "benchmarks/", "api/"]

# Runs in the page once it has loaded: waits for MathJax and the images, then reports.
PAGE_REPORT_JS = r"""
(async () => {
  const deadline = Date.now() + 20000;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await document.fonts.ready;
  for (const img of document.images) {
    if (!img.complete) {
      await new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r);
                               setTimeout(r, Math.max(0, deadline - Date.now())); });
    }
  }
  const root = document.querySelector(".md-content") || document.body;
  const clone = root.cloneNode(true);
  clone.querySelectorAll("pre, code, script, style, mjx-container, .headerlink")
       .forEach(e => e.remove());
  const text = clone.textContent;
  const rawTex = [];
  for (const pat of ["\\(", "\\[", "\\frac", "\\begin", "$$"]) {
    let i = text.indexOf(pat);
    if (i >= 0) rawTex.push(text.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, " "));
  }
  const unrendered = [...root.querySelectorAll(".arithmatex")]
    .filter(e => !e.querySelector("mjx-container"))
    .map(e => e.textContent.trim().slice(0, 80));
  // typeset but drawn empty (e.g. the characters' CSS was dropped): visible, yet zero width
  const blank = [...root.querySelectorAll("mjx-container")]
    .filter(c => c.getClientRects().length > 0 && c.getBoundingClientRect().width === 0)
    .map(c => (c.querySelector("mjx-assistive-mml") || c).textContent.trim().slice(0, 80));
  const texErrors = [...root.querySelectorAll("mjx-merror")]
    .map(e => e.getAttribute("data-mjx-error") || e.textContent.slice(0, 80));
  const images = [...root.querySelectorAll("img")];
  const broken = images.filter(i => i.naturalWidth === 0).map(i => i.getAttribute("src"));
  const shown = new Set(images.map(i => decodeURIComponent(i.src.split("/").pop())));
  const named = [...new Set(root.textContent.match(/[\w.-]+\.(?:png|svg|jpe?g|gif)\b/g) || [])];
  const wide = sel => [...root.querySelectorAll(sel)]
    .filter(e => e.scrollWidth > e.clientWidth + 2).length;
  return JSON.stringify({
    title: document.title, rawTex, unrendered, blank, texErrors, broken,
    shown: [...shown], named,
    wideCode: wide("pre > code"), wideTables: wide(".md-typeset__scrollwrap"),
    height: Math.ceil(document.documentElement.scrollHeight),
  });
})()
"""


class DevTools:
    """Minimal Chrome DevTools protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, executable: str, user_data_dir: str) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Move the child's ends above 3/4 so that the dup2 calls below cannot clobber them.
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def wire_pipes() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4, hi_r, hi_w),
            preexec_fn=wire_pipes,  # single-threaded at this point
        )
        os.close(hi_r)
        os.close(hi_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_child], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params: Any):
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            reply = self._read_message(left)
            if reply is None:
                break
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(f"{method}: no reply within {timeout} s")

    def wait_for(self, method: str, session: str, timeout: float) -> bool:
        """Wait until the event ``method`` of ``session`` arrives (True) or the timeout (False)."""
        end = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return True
            seen = len(self.events)
            left = end - time.monotonic()
            if left <= 0:
                return False
            reply = self._read_message(left)
            if reply is not None and "method" in reply:
                self.events.append(reply)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def console_errors(events: list[dict[str, Any]], session: str) -> list[str]:
    """Errors of one page: uncaught exceptions, ``console.error`` and failed requests."""
    out = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            out.append(f"uncaught: {description.splitlines()[0]} ({details.get('url', '')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            out.append(f"console.{params['type']}: {args[:200]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


def check_page(
    tools: DevTools, url: str, shot: Path | None, results_images: AbstractSet[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """``(failures, warnings)`` of one page; writes a full-page screenshot to ``shot``.

    ``results_images``: file names of the figures the site ships under ``results/``; the page
    fails when its text names one that it does not show.
    """
    target = tools.call("Target.createTarget", url="about:blank")["targetId"]
    session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable", session)
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        tools.call("Page.navigate", session, url=url)
        if not tools.wait_for("Page.loadEventFired", session, timeout=60):
            return [f"page did not finish loading within 60 s: {url}"], []
        result = tools.call(
            "Runtime.evaluate",
            session,
            timeout=60,
            expression=PAGE_REPORT_JS,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            return [f"page report failed: {result['exceptionDetails'].get('text')}"], []
        report = json.loads(result["result"]["value"])
        time.sleep(0.2)  # let late console messages arrive
        with contextlib.suppress(TimeoutError):
            tools.call("Runtime.evaluate", session, expression="1", timeout=5)
        failures = console_errors(tools.events, session)
        failures += [f"raw TeX in the text: …{s}…" for s in report["rawTex"]]
        failures += [f"math not typeset: {s}" for s in report["unrendered"][:5]]
        failures += [f"math drawn blank: {s}" for s in report["blank"][:5]]
        failures += [f"TeX error: {s}" for s in report["texErrors"][:5]]
        failures += [f"image did not load: {s}" for s in report["broken"]]
        missing = sorted(
            n for n in report["named"] if n in results_images and n not in set(report["shown"])
        )
        failures += [f"names {n} (a results image) but does not show it" for n in missing]
        warnings = []
        if report["wideCode"]:
            warnings.append(f"{report['wideCode']} code block(s) wider than the column")
        if report["wideTables"]:
            warnings.append(f"{report['wideTables']} table(s) wider than the column")
        if shot is not None:
            write_screenshots(tools, session, report["height"], shot)
        return list(dict.fromkeys(failures)), warnings
    finally:
        with contextlib.suppress(Exception):
            tools.call("Target.closeTarget", targetId=target, timeout=10)


def write_screenshots(tools: DevTools, session: str, height: int, shot: Path) -> None:
    """The whole page, in tiles of at most ``SHOT_TILE`` pixels: ``shot`` when one tile is
    enough, else ``<stem>_1.png``, ``<stem>_2.png``, ... (readable pieces of a long page)."""
    tops = list(range(0, max(height, 1), SHOT_TILE))
    for i, top in enumerate(tops, start=1):
        clip = {"x": 0, "y": top, "width": WIDTH, "height": min(SHOT_TILE, height - top)}
        data = tools.call(
            "Page.captureScreenshot",
            session,
            format="png",
            clip={**clip, "scale": 1},
            captureBeyondViewport=True,
        )["data"]
        path = shot if len(tops) == 1 else shot.with_name(f"{shot.stem}_{i}{shot.suffix}")
        path.write_bytes(base64.b64decode(data))


def site_pages(site: Path) -> list[str]:
    """URL paths (relative to the site root) of the built pages, home first."""
    pages = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site).as_posix()
        if rel.split("/")[0] in ("assets", "search"):
            continue
        pages.append("" if rel == "." else rel + "/")
    return sorted(pages, key=lambda p: (p != "", p))


@contextlib.contextmanager
def serve(site: Path):
    """Serve ``site`` on 127.0.0.1 on a free port; yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):
            super().log_message(format, *args)


def shot_name(page: str) -> str:
    return (page.strip("/").replace("/", "_") or "home") + ".png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="built site folder (mkdocs build --site-dir)")
    parser.add_argument("--url", help="check this served copy instead of serving SITE")
    parser.add_argument(
        "--screenshots",
        type=Path,
        default=Path(
            os.environ.get("DOCS_SCREENSHOTS")
            or Path(tempfile.gettempdir()) / "ess-po-docs-screenshots"
        ),
        help="folder for the screenshots (default: $DOCS_SCREENSHOTS or $TMPDIR/ess-po-docs-"
        "screenshots)",
    )
    parser.add_argument(
        "--shots",
        nargs="*",
        default=KEY_PAGES,
        help="pages to screenshot, as URL paths ('' is the home page; 'all' for every page)",
    )
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    args = parser.parse_args(argv)

    executable = shutil.which(args.chromium)
    if executable is None:
        print(f"Chromium not found ({args.chromium}): apt-get install -y chromium", file=sys.stderr)
        return 2
    site = args.site.resolve()
    pages = site_pages(site)
    if not pages:
        print(f"no pages under {site}: build the site first", file=sys.stderr)
        return 2
    figures = {p.name for p in (site / "results").rglob("*") if p.suffix in (".png", ".svg")}
    args.screenshots.mkdir(parents=True, exist_ok=True)
    shots = set(pages) if args.shots == ["all"] else set(args.shots)

    failed = 0
    with (
        tempfile.TemporaryDirectory(prefix="ess-po-chromium-") as profile,
        contextlib.ExitStack() as stack,
    ):
        # Chromium first: its start forks (preexec_fn), which is safest before the server thread
        tools = DevTools(executable, profile)
        stack.callback(tools.close)
        base = args.url or stack.enter_context(serve(site))
        base = base.rstrip("/") + "/"
        version = tools.call("Browser.getVersion")["product"]
        print(f"{version}; {len(pages)} pages from {base}")
        for page in pages:
            shot = args.screenshots / shot_name(page) if page in shots else None
            start = time.monotonic()
            failures, warnings = check_page(tools, base + page, shot, figures)
            status = "FAIL" if failures else "ok"
            print(f"{status:4} /{page} ({time.monotonic() - start:.1f} s)")
            for line in failures:
                print(f"     - {line}")
            for line in warnings:
                print(f"     (warning) {line}")
            failed += bool(failures)
    print(f"{len(pages) - failed} passed, {failed} failed")
    print(f"screenshots: {args.screenshots.resolve()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
