"""Build the book and read it in a real browser: headless Chromium, with the network blocked.

Every page a learner reads (home, setup, exercises, each page under chapters/, where to go next) is opened in a
1440x900 window. The check fails, naming the page and the problem, when:

- a diagram was not drawn (the reader sees mermaid source), or its text is displayed under 10 px;
- rendered text still reads as markdown: a code fence, ``!!! note``, ``--8<--``, ``[text](url.md)``,
  ``{ #anchor }``, ``**bold**``;
- more than 2% of a page's code lines do not fit their block without scrolling sideways;
- the page asked for anything outside the local server, as it would from a CDN.

How: ``mkdocs build --strict`` into a temporary folder; tools/check_book.js goes first into the
``<head>`` of each page there; http.server serves the folder on 127.0.0.1; ``chromium --headless
--dump-dom`` loads each page, and the script leaves its measurements in the dumped DOM. The network is
blocked twice: every host name resolves to nothing, and everything not on loopback goes to a proxy
port that refuses connections.

Without Chromium the build is still checked, and the browser check says SKIPPED. With ``--install``,
or with the environment variable CI set, as root with apt-get, it installs Debian's ``chromium`` first.

    python tools/check_book.py                 # build, then check in the browser
    python tools/check_book.py --site site     # check a site built already (so does MINISGL_BUILT_SITE=site)
    python tools/check_book.py --install       # apt-get install chromium when it is missing
    python tools/check_book.py --window 1920x1080
"""

import argparse
import base64
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fetch_assets
from course import REPO_ROOT

WINDOW = "1440x900"  # a laptop's browser window, in CSS pixels
MIN_TEXT_PX = 10.0  # diagram text displayed smaller than this cannot be read
MAX_OVERFLOW_SHARE = 0.02  # of a page's code lines that may need sideways scrolling
SCRIPT = Path(__file__).with_suffix(".js")
SKIPPED = "SKIPPED: headless Chromium is not installed (apt-get install chromium); the browser check did not run"


def pages(site: Path) -> list[str]:
    """The pages a learner reads, as paths under the site: home, setup, exercises, the chapters, where to go next."""
    found = ["index.html", "setup/index.html", "exercises/index.html"]
    found += sorted(str(p.relative_to(site)) for p in site.glob("chapters/*/index.html"))
    return found + (["next/index.html"] if (site / "next" / "index.html").is_file() else [])


def build(site: Path) -> None:
    if not fetch_assets.is_current():
        sys.exit(f"error: {fetch_assets.DESTINATION.relative_to(REPO_ROOT)} is missing or outdated; "
                 "run `make setup` (or python tools/fetch_assets.py)")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)]
    if subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode:
        sys.exit("error: mkdocs build --strict failed")


def find_chromium(install: bool) -> str | None:
    """Chromium's binary; installed with apt-get first when allowed (install, as root, apt-get there)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("installing chromium with apt-get", flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-qq", "-o", "Dpkg::Use-Pty=0"]
    if subprocess.run(apt + ["install", "-y", "chromium"], env=env, check=False).returncode:
        subprocess.run(apt + ["update"], env=env, check=False)
        if subprocess.run(apt + ["install", "-y", "chromium"], env=env, check=False).returncode:
            print("apt-get could not install chromium")
    return shutil.which("chromium") or shutil.which("chromium-browser")


def instrument(site: Path, page: str) -> int:
    """Put the measuring script first in the page's <head>; return how many diagrams the page has."""
    path = site / page
    html = path.read_text()
    script = f"<script>{SCRIPT.read_text()}</script>"
    path.write_text(re.sub(r"<head[^>]*>", lambda m: m[0] + script, html, count=1))
    return html.count('<pre class="mermaid">')


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def serve(site: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> socket.socket:
    """A loopback port that refuses connections (bound, never listening): the proxy that blocks the network."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def browse(chromium: str, url: str, proxy_port: int, window: str) -> dict | None:
    """Load url in headless Chromium with the network blocked; the measurements check_book.js left."""
    with tempfile.TemporaryDirectory(prefix="minisgl-chromium-") as profile:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
            f"--window-size={window.replace('x', ',')}", f"--proxy-server=http://127.0.0.1:{proxy_port}",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--virtual-time-budget=30000", "--dump-dom", url,
        ]
        try:
            dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False).stdout
        except subprocess.TimeoutExpired:
            return None
    found = re.search(r'data-book-check="([A-Za-z0-9+/=]+)"', dom)
    return json.loads(base64.b64decode(found[1])) if found else None


def diagram_problems(result: dict, expected: int) -> list[str]:
    if len(result["diagrams"]) != expected:
        return [f"the check saw {len(result['diagrams'])} of the page's {expected} diagrams"]
    found = []
    for number, diagram in enumerate(result["diagrams"], 1):
        name = f"diagram {number} (`{diagram['source']}`)"
        if not diagram["drawn"]:
            found.append(f"{name} was not drawn: the reader sees its mermaid source")
        elif diagram["error"]:
            found.append(f"{name}: mermaid could not read it and drew an error")
        elif diagram["textPx"] is not None and diagram["textPx"] < MIN_TEXT_PX:
            px = diagram["textPx"]
            found.append(f"{name}: text displayed at {px:.1f} px, under {MIN_TEXT_PX:.0f} px; {size(diagram)}")
    return found


def size(diagram: dict) -> str:
    return (
        f"smallest text \"{diagram['smallest'][:40]}\"; {diagram['naturalWidth']} px wide at full size, "
        f"drawn {diagram['width']} px wide in a {diagram['boxWidth']} px column"
    )


def diagram_notes(result: dict) -> list[str]:
    wide = [d for d in result["diagrams"] if d.get("drawn") and d["width"] > d["boxWidth"] + 1]
    return [f"diagram `{d['source']}` scrolls sideways, text {d['textPx']:.1f} px; {size(d)}" for d in wide]


def long_lines(result: dict) -> list[str]:
    found = []
    for block in result["code"]:
        if block["long"]:
            lines = ", ".join(f"{number} ({len(line)} chars)" for number, line in block["long"][:8])
            more = f" and {len(block['long']) - 8} more" if len(block["long"]) > 8 else ""
            found.append(f"{block['kind']} \"{block['title'][:50]}\" fits {block['fits']} chars: lines {lines}{more}")
    return found


def overflow(result: dict) -> tuple[int, int]:
    """How many of the page's code lines need sideways scrolling, and how many lines there are."""
    return sum(len(block["long"]) for block in result["code"]), sum(block["lines"] for block in result["code"])


def too_many_long(result: dict) -> bool:
    long, total = overflow(result)
    return total > 0 and long / total > MAX_OVERFLOW_SHARE


def local(url: str, origin: str) -> bool:
    return url.startswith(origin + "/") or not url.startswith(("http:", "https:", "ws:", "wss:"))


def problems(result: dict | None, expected_diagrams: int, origin: str, window: str) -> list[str]:
    if result is None:
        return ["the page did not finish loading in the browser (no measurements came back)"]
    if "failed" in result:
        return [f"the measuring script failed: {result['failed']}"]
    found = [f"asked the network for {url}" for url in result["requests"] if not local(url, origin)]
    if str(result["width"]) != window.split("x")[0]:
        found.append(f"the browser window was {result['width']} px wide, not {window}: the measurements are off")
    found += diagram_problems(result, expected_diagrams)
    found += [f"raw markdown ({item['what']}): {item['line'][:100]}" for item in result["prose"]]
    if too_many_long(result):
        long, total = overflow(result)
        found.append(f"{long} of {total} code lines ({long / total:.1%}) need sideways scrolling:")
        found += ["  " + line for line in long_lines(result)]
    return found


def notes(result: dict | None) -> list[str]:
    """What a reader still meets that is no failure: diagrams to scroll, a few code lines too long."""
    if result is None or "failed" in result:
        return []
    return diagram_notes(result) + ([] if too_many_long(result) else long_lines(result))


def summary(result: dict | None) -> str:
    if result is None or "failed" in result:
        return "no measurements"
    sizes = [d["textPx"] for d in result["diagrams"] if d.get("textPx")]
    text = f" (smallest text {min(sizes):.1f} px)" if sizes else ""
    long, total = overflow(result)
    return f"{len(result['diagrams'])} diagrams{text}, {total} code lines ({long} too long)"


def check(chromium: str, site: Path, window: str) -> bool:
    expected = {page: instrument(site, page) for page in pages(site)}
    server, blackhole = serve(site), closed_port()
    origin = f"http://127.0.0.1:{server.server_address[1]}"

    def one(page: str) -> tuple[str, dict | None, float]:
        started = time.perf_counter()
        result = browse(chromium, f"{origin}/{page}", blackhole.getsockname()[1], window)
        return page, result, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=2) as pool:  # two Chromiums at a time: CI has two cores
        results = list(pool.map(one, expected))
    server.shutdown()
    blackhole.close()
    failed = False
    for page, result, seconds in results:
        found = problems(result, expected[page], origin, window)
        failed |= bool(found)
        name = page.removesuffix("index.html") or "/"
        print(f"{'FAIL' if found else 'ok  '}  {name:<22} {seconds:4.1f}s  {summary(result)}")
        print("".join(f"      {line}\n" for line in found), end="")
        print("".join(f"      note: {line}\n" for line in notes(result)), end="")
    return not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, help="a built site to check instead of building one")
    parser.add_argument("--install", action="store_true", help="apt-get install chromium when it is missing")
    parser.add_argument("--window", default=WINDOW, help=f"the browser window, WIDTHxHEIGHT (default {WINDOW})")
    args = parser.parse_args()
    if args.site is None and os.environ.get("MINISGL_BUILT_SITE"):  # tools/run_tests.py built it once for all steps
        args.site = Path(os.environ["MINISGL_BUILT_SITE"])
    with tempfile.TemporaryDirectory(prefix="minisgl-site-") as temp:
        site = Path(temp) / "site"
        if args.site:
            shutil.copytree(args.site, site)
        else:
            build(site)
        chromium = find_chromium(args.install or os.environ.get("CI", "") not in ("", "0", "false"))
        if chromium is None:
            print(SKIPPED)
            return
        print(f"checking the book in {chromium}, window {args.window}, network blocked", flush=True)
        ok = check(chromium, site, args.window)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
