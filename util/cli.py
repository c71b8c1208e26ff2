"""Script plumbing shared by tool/*.py: logging set-up and one-line reporting of user errors.

A UserError (bad config, data, checkpoint or path) prints one line naming the culprit and exits
with status 2; `--debug` on the command line or SEMSEG_DEBUG=1 shows the full traceback instead.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from util.errors import UserError

LOG_FORMAT = "[%(asctime)s %(levelname)s] %(message)s"


def debug_enabled() -> bool:
    return os.environ.get("SEMSEG_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


def setup_logging(log_file: str | Path | None = None, is_main: bool = True) -> logging.Logger:
    """Main process logs INFO to stdout (and log_file); other ranks only warnings and errors."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return root


def user_error_message(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(err)
    if "Original Traceback" in text:  # torch's worker ExceptionWrapper: keep the original message only
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main() and turn its outcome into an exit status."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["SEMSEG_DEBUG"] = "1"
    try:
        status = main()
    except UserError as err:
        if debug_enabled():
            raise
        print(f"error: {user_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    """Throughput and ETA for a loop of known length that may start part-way (a resumed run)."""

    def __init__(self, total: int, start: int = 0):
        self.total = total
        self.start = start
        self.t0 = time.perf_counter()

    def line(self, done: int) -> str:
        """`done/total elapsed ETA`, the rate measured on the items done since this object was made."""
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        return f"{done}/{self.total} elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
