"""Script plumbing shared by tool/*.py: logging set-up and one-line reporting of user errors.

A UserError (bad config, data, checkpoint or path) prints one line naming the culprit and exits
with status 2; `--debug` on the command line or SEMSEG_DEBUG=1 shows the full traceback instead.
Running out of memory (a data-loader worker killed by the out-of-memory killer, CUDA out of
memory) exits with status 1 and one line, and an OSError in a library's exit-time clean-up
(TensorBoard flushing to a full disk) is one warning line. Anything else is
a bug and keeps its traceback. Whatever ends a run, the tool's log file ends with what the user
saw (the error line, or the traceback), so a log read later tells how the run ended.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Sequence

from util.errors import RunStopped, UserError

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


WORKER_DIED = "DataLoader worker (pid"  # how torch's RuntimeError starts when a worker process dies
RESUME_HINT = "training goes on from its last checkpoint with TRAIN.resume auto"


def out_of_resources_message(err: RuntimeError) -> str | None:
    """One line for running out of host or GPU memory (not a bug, not a user mistake), else None."""
    text = str(err)
    if text.startswith(WORKER_DIED):
        return (f"{text}: a data-loader worker process died, most often killed by the out-of-memory "
                f"killer (see dmesg); lower the data workers or the batch size, or free memory, then run "
                f"again ({RESUME_HINT})")
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        first = ". ".join(text.split(". ")[:2]).splitlines()[0].rstrip(".")
        return (f"{first}: the GPU ran out of memory; lower TRAIN.batch_size (TRAIN.accum_steps keeps the global "
                f"batch), the crop, or TEST.test_batch_size for evaluation, or use TRAIN.amp bf16 ({RESUME_HINT})")
    return None


def _qualified_name(thing) -> str:
    return f"{getattr(thing, '__module__', '')}.{getattr(thing, '__qualname__', repr(thing))}".lstrip(".")


def one_line_unraisable(unraisable) -> None:
    """sys.unraisablehook: an OSError in an atexit callback or finaliser (tensorboardX flushes its
    event file at exit, which fails on a full disk) is one warning line after our own error."""
    if debug_enabled() or not isinstance(unraisable.exc_value, OSError):
        sys.__unraisablehook__(unraisable)
        return
    print(f"warning: {_qualified_name(unraisable.object)} failed while exiting: {unraisable.exc_value}",
          file=sys.stderr)


def one_line_thread_error(args) -> None:
    """threading.excepthook: the same for a library's background thread (tensorboardX's event
    writer thread finds its queue closed when the exit-time flush failed)."""
    if debug_enabled() or args.exc_type is None or not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)
        return
    print(f"warning: background thread {_qualified_name(type(args.thread))} stopped: {args.exc_value}",
          file=sys.stderr)


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_to_files(text: str) -> None:
    """Append `text` to the log files setup_logging opened, not to the terminal (which has it already)."""
    record = logging.LogRecord("run", logging.ERROR, __file__, 0, text, None, None)
    for handler in _file_handlers():
        handler.handle(record)


def _report(line: str, status: int) -> int:
    print(line, file=sys.stderr)
    log_to_files(line)
    return status


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main() and turn its outcome into an exit status; the log files get the
    same last line as the terminal."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["SEMSEG_DEBUG"] = "1"
    sys.unraisablehook = one_line_unraisable
    threading.excepthook = one_line_thread_error
    try:
        status = main()
    except UserError as err:
        if debug_enabled():
            log_to_files(traceback.format_exc().rstrip())
            raise
        status = _report(f"error: {user_error_message(err)}", 2)
    except RuntimeError as err:
        reason = None if debug_enabled() else out_of_resources_message(err)
        if reason is None:
            log_to_files(traceback.format_exc().rstrip())
            raise
        status = _report(f"error: {reason}", 1)
    except RunStopped as stop:
        status = _report(f"stopped; {stop}", stop.status)
    except KeyboardInterrupt as interrupt:  # a script may say in it how to continue
        status = _report(f"interrupted; {interrupt}" if str(interrupt) else "interrupted", 130)
    except Exception:  # a bug: its traceback goes to the terminal and, the same, to the log
        log_to_files(traceback.format_exc().rstrip())
        raise
    # Out of the except clause the failed run's frames are garbage: collecting them now lets a
    # DataLoader in them stop its workers itself. Left to the exit hooks, multiprocessing would
    # terminate those workers while torch still watches them, and print its own traceback.
    gc.collect()
    sys.exit(status or 0)


@contextlib.contextmanager
def removed_if_failed_empty(folder: Path, own: bool = True) -> Iterator[None]:
    """A result folder this run creates is removed when the run fails before writing any result
    into it (nothing there but its config.yaml and logs): a folder left behind would look like a
    finished run, and the terminal has the error. A folder that was there before is left as it is
    (its new log ends with the error, see run_main). own=False (another process writes it): no-op."""
    existed = not own or folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and all(p.name == "config.yaml" or p.suffix == ".log"
                                                   for p in folder.iterdir()):
            for handler in _file_handlers():
                if Path(handler.baseFilename).parent == folder.resolve():
                    logging.getLogger().removeHandler(handler)
                    handler.close()
            shutil.rmtree(folder)
        raise


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

    def rate(self, done: int) -> float:
        """Items per second, measured on the items done since this object was made."""
        elapsed = time.perf_counter() - self.t0
        return (done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self, done: int) -> str:
        """`done/total elapsed ETA`, the rate measured on the items done since this object was made."""
        elapsed = time.perf_counter() - self.t0
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        return f"{done}/{self.total} elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"


def map_with_progress(function: Callable, items: Sequence, workers: int, label: str, *,
                      initializer: Callable | None = None, initargs: tuple = (), ordered: bool = True,
                      every_seconds: float = 5.0) -> Iterator:
    """function(item) for every item, in `workers` processes when > 1 (in item order unless
    ordered=False), printing `label done/total elapsed ETA` every few seconds and at the end."""
    progress, last_report = Progress(len(items)), time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(items) > 1:
            pool = stack.enter_context(multiprocessing.Pool(min(workers, len(items)), initializer, initargs))
            chunk = max(1, min(32, len(items) // (8 * workers)))
            results = (pool.imap if ordered else pool.imap_unordered)(function, items, chunksize=chunk)
        else:
            if initializer is not None:
                initializer(*initargs)
            results = map(function, items)
        for done, result in enumerate(results, start=1):
            yield result
            if done == len(items) or time.perf_counter() - last_report >= every_seconds:
                print(f"  {label} {progress.line(done)}", flush=True)
                last_report = time.perf_counter()
