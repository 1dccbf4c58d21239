"""Look at the built book in a real browser: what a reader sees, checked where tests cannot.

For every chapter page of ``_build/html`` (build it first: ``jupyter-book build .``) this opens
headless Chromium at a laptop's width and, in the rendered page,

* finds every output block or table that scrolls sideways (its content wider than its box),
* finds every output that shows a bare ``True`` (a claim or check echoing its value),
* finds every progress bar that renders on more than one line (a bar's description repeated
  within one output),

then saves a screenshot of each of them, and of each chapter's first progress bar and widest
table, so a person can look. It writes ``benchmarks/browser_check.json`` and the screenshots to
``_build/browser_check/``. No test runs it: Chromium is not part of the course's stack (on Debian,
``apt-get install chromium``), and CI need not have it.

    python tools/browser_check.py                 # every chapter
    python tools/browser_check.py 07_beyond       # one chapter

It drives Chromium over the DevTools protocol with tornado's websocket client (installed with
Jupyter), so it needs nothing the course does not already install.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "browser_check"
RESULT = ROOT / "benchmarks" / "browser_check.json"
WIDTH, HEIGHT = 1280, 900  # a laptop's window; the book's text column is what limits outputs

CHECK_JS = r"""
(() => {
  let marks = 0;  // each element found gets an id, so that it can be scrolled to and shot later
  const box = (el) => { if (!el.dataset.bc) el.dataset.bc = String(marks++); return el.dataset.bc; };
  const snippet = (el) => (el.innerText || "").trim().slice(0, 160);
  const outputs = [...document.querySelectorAll("div.cell_output")];
  const scrolling = [];
  for (const el of document.querySelectorAll("div.cell_output pre, div.cell_output table, " +
                                              "div.cell_output .output, div.cell_output div")) {
    if (el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0 &&
        getComputedStyle(el).overflowX !== "visible") {
      scrolling.push({what: el.tagName.toLowerCase(), overflow_px: el.scrollWidth - el.clientWidth,
                      text: snippet(el), box: box(el)});
    }
  }
  const page_overflow = document.documentElement.scrollWidth - innerWidth;
  const stray_true = outputs.filter(o => /(^|\n)\s*True\s*($|\n)/.test(o.innerText))
                            .map(o => ({text: snippet(o), box: box(o)}));
  const bars = [], multi_line_bars = [];
  for (const o of outputs) {
    const lines = (o.innerText || "").split("\n").filter(l => /\d+%\|/.test(l));
    if (!lines.length) continue;
    bars.push({text: snippet(o), box: box(o), lines: lines.length});
    const descs = lines.map(l => l.split(/:\s+\d+%\|/)[0].replace(/^\s*>>\s*/, "").trim());
    const seen = new Set(), repeated = new Set();
    for (const d of descs) { if (seen.has(d)) repeated.add(d); seen.add(d); }
    if (repeated.size) multi_line_bars.push({bars: [...repeated], text: snippet(o), box: box(o)});
  }
  const tables = [...document.querySelectorAll("div.cell_output table")]
    .map(t => ({width: t.getBoundingClientRect().width, box: box(t), text: snippet(t)}))
    .sort((a, b) => b.width - a.width);
  const column = document.querySelector("main, .bd-article, article");
  return {outputs: outputs.length, scrolling, page_overflow, stray_true, multi_line_bars,
          bars: bars.length, first_bar: bars[0] || null, widest_table: tables[0] || null,
          text_column_px: column ? column.getBoundingClientRect().width : null};
})()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One Chromium tab, driven over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.write_message(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.read_message())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def open(self, url: str, timeout: float = 60.0) -> None:
        await self.call("Page.navigate", url=url)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if await self.evaluate("document.readyState === 'complete'"):
                await asyncio.sleep(1.5)  # MathJax and fonts settle after the load event
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(url)

    async def shoot(self, mark: str, path: Path, pad: int = 12) -> None:
        """A screenshot of the element marked ``mark``, scrolled into view first (at most a screen)."""
        r = await self.evaluate(
            f"(() => {{ const el = document.querySelector('[data-bc=\"{mark}\"]'); "
            "el.scrollIntoView({block: 'start'}); const r = el.getBoundingClientRect(); "
            "return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()"
        )
        await asyncio.sleep(0.2)
        clip = {
            "x": max(0.0, r["x"] - pad),
            "y": max(0.0, r["y"] - pad),
            "width": min(float(WIDTH), r["width"] + 2 * pad),
            "height": min(float(HEIGHT), r["height"] + 2 * pad),
            "scale": 1,
        }
        shot = await self.call("Page.captureScreenshot", format="png", clip=clip)
        path.write_bytes(base64.b64decode(shot["data"]))


async def check(chapters: list[str], chromium: str) -> dict:
    port, profile_dir = free_port(), tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("Chromium did not open its DevTools port")
        tab = next(t for t in targets if t["type"] == "page")
        page = Page(await websocket_connect(tab["webSocketDebuggerUrl"], max_message_size=1 << 28))
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        version = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version"))["Browser"]
        results = {}
        for stem in chapters:
            html = HTML / "solutions" / f"{stem}.html"
            if not html.exists():
                raise FileNotFoundError(f"{html} is missing: build the book first (jupyter-book build .)")
            await page.open(html.as_uri())
            found = await page.evaluate(CHECK_JS)
            shots = []
            marked = [("scroll", x) for x in found["scrolling"]] + [("true", x) for x in found["stray_true"]]
            marked += [("bar", x) for x in found["multi_line_bars"]]
            if found["first_bar"]:
                marked.append(("first-bar", found["first_bar"]))
            if found["widest_table"]:
                marked.append(("widest-table", found["widest_table"]))
            for i, (kind, item) in enumerate(marked):
                path = SHOTS / f"{stem}-{i:02d}-{kind}.png"
                await page.shoot(item["box"], path)
                shots.append(str(path.relative_to(ROOT)))
            results[stem] = {
                "outputs": found["outputs"],
                "progress_bar_outputs": found["bars"],
                "text_column_px": found["text_column_px"],
                "page_overflow_px": max(0, found["page_overflow"]),
                "scrolling_outputs": [{k: v for k, v in x.items() if k != "box"} for x in found["scrolling"]],
                "stray_true": [x["text"] for x in found["stray_true"]],
                "multi_line_bars": [x["bars"] for x in found["multi_line_bars"]],
                "widest_table_px": found["widest_table"]["width"] if found["widest_table"] else None,
                "screenshots": shots,
            }
            print(
                f"{stem}: {found['outputs']} outputs, {len(found['scrolling'])} scroll sideways, "
                f"{len(found['stray_true'])} show a bare True, {len(found['multi_line_bars'])} bars on "
                f"several lines; {len(shots)} screenshots"
            )
        return {"browser": version, "window": [WIDTH, HEIGHT], "chapters": results}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(profile_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", help="stems like 07_beyond (default: every chapter)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("no Chromium here: on Debian, apt-get install chromium", file=sys.stderr)
        return 2
    chapters = args.chapters or sorted(p.stem for p in (ROOT / "solutions").glob("*.ipynb"))
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    report = asyncio.run(check(chapters, chromium))
    report["date"] = time.strftime("%Y-%m-%d")
    old = json.loads(RESULT.read_text()) if RESULT.exists() and args.chapters else {"chapters": {}}
    report["chapters"] = {**old.get("chapters", {}), **report["chapters"]}
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    bad = [
        stem
        for stem, r in report["chapters"].items()
        if r["scrolling_outputs"] or r["stray_true"] or r["multi_line_bars"] or r["page_overflow_px"]
    ]
    print(f"wrote {RESULT.relative_to(ROOT)}; screenshots in {SHOTS.relative_to(ROOT)}")
    print("clean" if not bad else f"to look at: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
