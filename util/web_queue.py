"""The network queue and the video jobs of the web demo (tool/serve.py, util/web_app.py).

One worker thread runs every network call, in the order they arrive: two requests at once never
run two networks at once (they would share the cores or the GPU and both finish later, and
together could exhaust its memory). A video is segmented by a job of its own, one job at a time;
each of its frames queues for the network like an image does, so an image uploaded during a
video waits for one frame, not for the whole video. A job's folder has a random name; the
client only ever sees that token, and the files are removed with older jobs and at shutdown.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from util.cli import Progress
from util.errors import DataError
from util.video import FramesTooLarge, VideoReader, segment_video

logger = logging.getLogger(__name__)
KEEP_FINISHED = 4  # finished video jobs whose overlay stays downloadable


class Refused(Exception):
    """An upload this server will not process; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NetworkQueue:
    """The Predictor behind a single worker thread; at most `max_waiting` image requests queue."""

    def __init__(self, predictor, max_waiting: int):
        self.predictor, self.max_waiting = predictor, max_waiting
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="network")
        self.waiting, self.count_lock = 0, threading.Lock()

    def submit(self, image: np.ndarray) -> Future:
        """A future of (labels, seconds the network took) for an RGB image; Refused (503) when full."""
        with self.count_lock:
            if self.waiting >= self.max_waiting:
                raise Refused(503, f"the server is busy ({self.waiting} images queued); try again shortly")
            self.waiting += 1
        future = self.executor.submit(self.timed_predict, image)
        future.add_done_callback(self.release)
        return future

    def release(self, _: Future) -> None:
        with self.count_lock:
            self.waiting -= 1

    def timed_predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        labels = self.predictor.predict(image)
        return labels, time.perf_counter() - start

    def predict(self, image: np.ndarray) -> np.ndarray:
        """A video frame's labels, through the same worker (not counted against max_waiting)."""
        return self.executor.submit(self.predictor.predict, image).result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class VideoJob:
    """One uploaded video on its way through segment_video, as the page polls it."""
    token: str
    folder: Path
    total: int  # frames the file announces (0: not recorded)
    state: str = "queued"  # queued | running | done | failed
    done: int = 0
    error: str = ""
    overlay: Path | None = None
    progress: Progress | None = field(default=None, repr=False)

    def status(self) -> dict:
        """What GET /video/<token> answers: state, frames done and total, seconds left, error."""
        eta = None
        if self.state == "running" and self.total and self.done:
            eta = round(max(0, self.total - self.done) / self.progress.rate(self.done), 1)
        return {"state": self.state, "frames_done": self.done, "frames_total": self.total, "eta_seconds": eta,
                "error": self.error}


class CountingPredictor:
    """The network queue as segment_video's predictor: counts a job's frames, stops past the limit."""

    def __init__(self, network: NetworkQueue, job: VideoJob, max_frames: int, stopping: threading.Event):
        self.network, self.job, self.max_frames, self.stopping = network, job, max_frames, stopping

    def predict(self, image: np.ndarray) -> np.ndarray:
        if self.stopping.is_set():
            raise DataError("the server is shutting down")
        if self.job.done >= self.max_frames:
            raise DataError(f"the video has more than {self.max_frames} frames, the most this server takes "
                            f"(--max-video-frames)")
        labels = self.network.predict(image)
        self.job.done += 1
        return labels


class VideoJobs:
    """Video uploads checked, queued and segmented one at a time into a private temporary folder."""

    def __init__(self, network: NetworkQueue, colors: np.ndarray, names: Sequence[str] | None,
                 max_pixels: int, max_frames: int, max_waiting: int):
        self.network, self.colors, self.names = network, colors, names
        self.max_pixels, self.max_frames, self.max_waiting = max_pixels, max_frames, max_waiting
        self.root: Path | None = None  # made for the first video, removed by close()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video")
        self.jobs: dict[str, VideoJob] = {}
        self.lock, self.stopping = threading.Lock(), threading.Event()

    def get(self, token: str) -> VideoJob:
        job = self.jobs.get(token)
        if job is None:
            raise Refused(404, "no such video job (finished jobs are kept only for a while)")
        return job

    def start(self, data: bytes) -> VideoJob:
        """Open the upload (Refused 400 when it does not decode, 413 when too large) and queue it."""
        with self.lock:
            if sum(job.state in ("queued", "running") for job in self.jobs.values()) >= self.max_waiting:
                raise Refused(503, "the server is busy with other videos; try again later")
            self.forget_old_jobs()
            self.root = self.root or Path(tempfile.mkdtemp(prefix="semseg-serve-"))
            token = secrets.token_urlsafe(12)
            folder = self.root / token
            folder.mkdir()
        path = folder / "video.upload"  # a name of ours: FFmpeg recognises the container by its content
        path.write_bytes(data)
        try:
            reader = self.open_checked(path)
        except Refused:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = VideoJob(token, folder, reader.announced)
        with self.lock:
            self.jobs[token] = job
        self.executor.submit(self.run, job, reader)
        return job

    def open_checked(self, path: Path) -> VideoReader:
        try:
            reader = VideoReader(path, max_pixels=self.max_pixels)
        except FramesTooLarge as err:
            raise Refused(413, str(err).split(": ", 1)[-1] + " (--max-pixels)") from None
        except DataError as err:  # its message starts "--video <path>: "; the client needs neither
            raise Refused(400, "the video upload: " + str(err).split(": ", 1)[-1]) from None
        if reader.announced > self.max_frames:
            reader.close()
            raise Refused(413, f"the video has {reader.announced} frames; this server takes at most {self.max_frames} "
                               f"(--max-video-frames)")
        return reader

    def run(self, job: VideoJob, reader: VideoReader) -> None:
        job.progress, job.state = Progress(job.total), "running"
        try:
            predictor = CountingPredictor(self.network, job, self.max_frames, self.stopping)
            job.overlay = segment_video(predictor, reader, job.folder, self.colors, self.names)[0]
            job.state = "done"
        except DataError as err:  # the client sees the job's token, never the server's folders
            job.state, job.error = "failed", str(err).replace(str(job.folder), "the job's folder")
        except Exception as err:  # a bug: keep serving, log the traceback, tell the page
            logger.exception("video job %s failed", job.token)
            job.state, job.error = "failed", f"segmenting the video failed ({type(err).__name__}); see the server log"
        finally:
            (job.folder / "video.upload").unlink(missing_ok=True)

    def forget_old_jobs(self) -> None:
        """Delete all but the newest KEEP_FINISHED finished jobs (the caller holds the lock)."""
        finished = [job for job in self.jobs.values() if job.state in ("done", "failed")]
        for job in finished[:-KEEP_FINISHED]:
            shutil.rmtree(job.folder, ignore_errors=True)
            del self.jobs[job.token]

    def close(self) -> None:
        """Stop the running job at its next frame, drop the queued ones, delete every file."""
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
