"""Check the web demo's page in headless Chromium: upload an image, wait for the overlay and legend.

  python tool/check_web_page.py --config=config/toy/toy_pspnet18.yaml --image=photo.jpg
  python tool/check_web_page.py --config=config/toy/toy_pspnet18.yaml --image=photo.jpg --screenshot docs/web_demo.png

Starts tool/serve.py's server in this process on 127.0.0.1 (a free port), opens its page in
Debian's chromium (--chromium), gives the page's file input the image as a user choosing it
would, and waits until the overlay and the legend show. It prints the page's upload-to-overlay
time (from choosing the file to the overlay drawn: upload, queue, network, download, decoding)
and the legend, and exits non-zero when either does not appear. tests/test_serve.py runs the same
check on a tiny model.

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe: JSON
messages ending in a NUL byte on file descriptors 3 and 4), which needs neither a WebSocket
library nor a driver binary.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
from util.cli import run_main, setup_logging  # noqa: E402
from tool.serve import add_limit_options, build_demo, limits_of  # noqa: E402
from util.config import add_config_arguments, load_config, parse_config_args  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.web_app import ServerThread  # noqa: E402

logger = logging.getLogger("check_web_page")
CHROMIUM = "/usr/bin/chromium"
WINDOW = (900, 560)  # the screenshot's size in CSS pixels
# What the page shows, read in the page: the overlay drawn, the legend's lines, an error line.
PAGE_STATE = """({
  overlay: !document.getElementById("result").hidden && document.getElementById("mask").naturalWidth > 0,
  legend: [...document.querySelectorAll("#legend li")].map((li) => li.innerText.replace(/\\s+/g, " ").trim()),
  error: document.getElementById("error").textContent,
  timing: document.getElementById("timing").textContent,
  seconds: Number(document.body.dataset.overlaySeconds) || null})"""


def descriptor_from_10(fd: int) -> int:
    """The same open file on a descriptor numbered 10 or more; `fd` is closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


def check_chromium(executable: str) -> None:
    if not Path(executable).is_file():
        raise UserError(f"--chromium {executable}: not found (Debian: apt-get install chromium)")


class Chromium:
    """A headless Chromium and one page in it, driven by DevTools protocol commands over a pipe."""

    def __init__(self, executable: str = CHROMIUM, timeout: float = 30):
        check_chromium(executable)
        self.timeout, self.next_id, self.buffer = timeout, 0, b""
        self.profile = tempfile.TemporaryDirectory(prefix="check-web-page-")
        to_chromium, self.commands = os.pipe()
        self.replies, from_chromium = os.pipe()
        # Chromium reads commands on descriptor 3 and writes replies on 4. bash moves the pipes there
        # (a preexec_fn would run Python in the child of a threaded process); from 10 up, neither
        # can be descriptor 3 or 4 before it is moved.
        to_chromium, from_chromium = (descriptor_from_10(fd) for fd in (to_chromium, from_chromium))
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chromium} 4>&{from_chromium}', "bash", executable, "--headless",
             "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            pass_fds=(to_chromium, from_chromium), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self.session = ""

    def call(self, method: str, **params) -> dict:
        """Send one command to the page (once open) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"Chromium: {method}: {reply['error'].get('message')}")
                    return reply["result"]
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"Chromium did not answer {method} within {self.timeout:g} s")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self.process.poll()}) during {method}")
            self.buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not show {what} within {timeout:g} s")
            time.sleep(0.05)

    def choose_file(self, selector: str, path: Path) -> None:
        """Give a file input a file, as a user choosing it does (the page sees a change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path.resolve())])

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def check_page(url: str, image: Path, screenshot: Path | None = None, chromium: str = CHROMIUM,
               timeout: float = 60) -> dict:
    """Upload `image` on the page at `url`; the page's state once the overlay shows (or an error line)."""
    with Chromium(chromium) as browser:
        browser.open(url)
        browser.wait_for("document.readyState === 'complete' && document.getElementById('limits').textContent",
                         "its limits (GET /info)", timeout)
        browser.choose_file("#file", image)
        browser.wait_for(f"(state => state.overlay || !!state.error)({PAGE_STATE})", "the overlay", timeout)
        state = browser.evaluate(PAGE_STATE)
        if screenshot is not None:
            browser.screenshot(screenshot)
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image to upload")
    parser.add_argument("--screenshot", help="write a PNG of the page with the overlay here")
    parser.add_argument("--chromium", default=CHROMIUM, help="the Chromium executable (default %(default)s)")
    add_limit_options(parser)
    add_config_arguments(parser)
    args = parse_config_args(parser)
    setup_logging()
    image = Path(args.image)
    if not image.is_file():
        raise UserError(f"--image {image}: file not found")
    check_chromium(args.chromium)
    set_process_threads()
    demo = build_demo(load_config(args.config, args.opts), limits_of(args), args.config)
    server = ServerThread(demo.app())
    try:
        logger.info("page %s, image %s", server.url, image)
        state = check_page(server.url + "/", image, Path(args.screenshot) if args.screenshot else None, args.chromium)
    finally:
        server.stop()
    if state["error"]:
        raise UserError(f"the page shows an error: {state['error']}")
    if not state["overlay"] or not state["legend"]:
        raise UserError(f"the page shows no {'overlay' if not state['overlay'] else 'legend'}")
    logger.info("overlay shown %.3f s after the upload (the page: %s); legend: %s", state["seconds"], state["timing"],
                "; ".join(state["legend"]))
    if args.screenshot:
        logger.info("screenshot %s", args.screenshot)
    return 0


if __name__ == "__main__":
    run_main(main)
