"""Segment a video file frame by frame: an overlay video with a colour legend, and gray label PNGs.

    from util.video import VideoReader, segment_video
    written = segment_video(predictor, VideoReader(Path("drive.mp4")), Path("out"), colors, names, save_labels=True)

OpenCV reads the input (the FFmpeg inside the opencv-python wheel: no extra dependency) and writes
<output>/<stem>_overlay.mp4 with the input's frame count, frame rate and size, coded as MPEG-4
Part 2 (fourcc mp4v, the codec the wheel can write without further libraries; H.264 needs an FFmpeg
built with an encoder). Audio is not carried over. Each overlay frame carries a legend of the
classes present in its segmentation. With save_labels, <output>/<stem>_frames/<index:06d>.png
holds the gray class ids of each segmented frame (index counts from 0 in the input).

every=N segments frames 0, N, 2N, ... only; a frame in between shows the latest segmentation over
its own picture, so the overlay keeps the input's length and timing.

Both outputs are written under hidden temporary names in the output folder and renamed when the
whole video is done and the written file reads back with every frame: an error or an interruption
(Ctrl-C) leaves no half-written file, and an earlier result under the same names stays until then.
A killed process cannot clean up; the next run on the same video removes what it left.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np

from util.cli import Progress, debug_enabled
from util.errors import DataError, UserError
from util.image_io import IMAGE_SUFFIXES
from util.palette import colorize, write_png

logger = logging.getLogger(__name__)
FOURCC = "mp4v"
DEFAULT_FPS = 25.0  # for the rare file that records no frame rate
REPORT_SECONDS = 5.0  # how often the progress line is logged
# FFmpeg prints its own complaints about a damaged file on stderr; the DataError says it in one line.
# OpenCV reads the variable when it first uses FFmpeg, so setting it here, before that, is enough.
if not debug_enabled():
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
# The first bytes of the containers people mostly have, to tell "not a video" from "a codec OpenCV lacks".
CONTAINERS = ((4, b"ftyp", "MP4/MOV"), (0, b"RIFF", "AVI"), (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
              (0, b"OggS", "Ogg"))


class FramePredictor(Protocol):
    def predict(self, image: np.ndarray) -> np.ndarray: ...


@contextlib.contextmanager
def opencv_quiet() -> Iterator[None]:
    """OpenCV's own error lines (a missing decoder) silenced, unless --debug: the caller reports."""
    if debug_enabled():
        yield
        return
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def container_of(path: Path) -> str | None:
    """The container format named by the file's first bytes, if it is one of CONTAINERS."""
    with open(path, "rb") as f:
        head = f.read(12)
    return next((name for offset, magic, name in CONTAINERS if head[offset:offset + len(magic)] == magic), None)


def fourcc_text(code: float) -> str:
    """OpenCV's CAP_PROP_FOURCC as its four characters."""
    return int(code).to_bytes(4, "little").decode("ascii", "replace").strip("\x00") or "unknown"


class VideoReader:
    """The frames of a video file (BGR uint8), its frame rate, size and announced frame count.

    Opening fails with one DataError naming the file: missing, empty, an image, not a video, or a
    video whose codec OpenCV's FFmpeg cannot decode (the first frame is decoded to find out)."""

    def __init__(self, path: Path):
        self.path = path
        where = f"--video {path}"
        if not path.is_file():
            raise DataError(f"{where}: {'is a folder' if path.is_dir() else 'file not found'}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(f"{where}: is an image; segment it with --image")
        if path.stat().st_size == 0:
            raise DataError(f"{where}: file is empty")
        with opencv_quiet():
            self.capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
            if not self.capture.isOpened():
                container = container_of(path)
                if container is None:
                    raise DataError(f"{where}: not a video file OpenCV can read (expected e.g. MP4, AVI, MKV)")
                raise DataError(f"{where}: a {container} file that OpenCV cannot decode: damaged, or its "
                                "codec is missing from OpenCV's FFmpeg (convert it, e.g. ffmpeg -i in -c:v libx264 "
                                "out.mp4)")
            ok, self.first = self.capture.read()
        self.fourcc = fourcc_text(self.capture.get(cv2.CAP_PROP_FOURCC))
        if not ok:
            self.capture.release()
            raise DataError(f"{where}: no frame could be decoded (codec {self.fourcc}): the file is damaged or "
                            f"OpenCV's FFmpeg lacks the codec")
        self.height, self.width = self.first.shape[:2]
        self.announced = max(int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)  # 0: not recorded
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps > 0 else DEFAULT_FPS
        if fps <= 0:
            logger.warning("%s records no frame rate; the overlay uses %g frames/s", path, DEFAULT_FPS)

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.first
        with opencv_quiet():
            while True:
                ok, frame = self.capture.read()
                if not ok:
                    return
                yield frame

    def close(self) -> None:
        self.capture.release()


def legend_layout(frame_height: int) -> tuple[int, int]:
    """(pixels per legend entry, margin): readable on small frames, not overwhelming on large ones."""
    row = max(10, round(frame_height / 28))
    return row, max(2, row // 4)


def draw_legend(frame: np.ndarray, present: Sequence[int], colors: np.ndarray, names: Sequence[str]) -> None:
    """A swatch and a name per class in `present`, top-left on a darkened box (in place, BGR)."""
    row, margin = legend_layout(frame.shape[0])
    scale, thickness = row * 0.6 / 22, max(1, row // 24)  # Hershey letters are about 22 px tall at scale 1
    widths = [cv2.getTextSize(names[c], cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for c in present]
    box_w, box_h = 2 * margin + row + max(widths, default=0), 2 * margin + row * len(present)
    box = frame[:box_h, :box_w]
    box[:] = box // 3  # darkened, not hidden: the segmentation stays visible under the legend
    for i, c in enumerate(present):
        top = margin + i * row
        swatch = tuple(int(v) for v in colors[c][::-1])
        cv2.rectangle(frame, (margin, top + 1), (margin + row - 3, top + row - 2), swatch, thickness=-1)
        cv2.putText(frame, names[c], (margin + row, top + round(row * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)


def overlay_frame(frame: np.ndarray, labels: np.ndarray, colors: np.ndarray, names: Sequence[str],
                  alpha: float) -> np.ndarray:
    """The BGR frame blended with the class colours of `labels` (weight alpha), with the legend."""
    color = colorize(labels, colors)[..., ::-1]
    out = (frame * (1 - alpha) + color * alpha).clip(0, 255).astype(np.uint8)
    draw_legend(out, [int(c) for c in np.unique(labels) if c < len(colors)], colors, names)
    return out


def temporary_name(final: Path, pid: int) -> Path:
    """A hidden name beside `final` that keeps its suffix (OpenCV picks the container by it)."""
    return final.with_name(f".{final.stem}.tmp{pid}{final.suffix}")


def stale_temporaries(final: Path) -> list[Path]:
    """Temporaries of `final` that a killed run left behind (SIGKILL and SIGTERM skip the clean-up)."""
    pattern = re.compile(rf"\.{re.escape(final.stem)}\.tmp\d+{re.escape(final.suffix)}")  # temporary_name's
    return [p for p in final.parent.iterdir() if pattern.fullmatch(p.name)] if final.parent.is_dir() else []


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(finals: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary paths for `finals`, renamed to them when the block completes, removed when it fails
    (and when a killed run left them)."""
    for stale in (p for final in finals for p in stale_temporaries(final)):
        remove(stale)
    temporaries = [temporary_name(f, os.getpid()) for f in finals]
    try:
        yield temporaries
    except BaseException:
        for temporary in temporaries:
            remove(temporary)
        raise
    for temporary, final in zip(temporaries, finals):
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(temporary, final)


def frames_in(path: Path) -> int:
    """The frame count a written video file records (0 when it cannot be opened)."""
    with opencv_quiet():
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        capture.release()
    return max(count, 0)


def segment_video(predictor: FramePredictor, reader: VideoReader, output: Path, colors: np.ndarray,
                  names: Sequence[str] | None = None, every: int = 1, save_labels: bool = False,
                  alpha: float = 0.5) -> list[Path]:
    """Write the overlay video (and with save_labels the label PNGs) of the video into `output`, close
    the reader and return what was written. `predictor.predict` takes an RGB float image and gives
    H x W class ids."""
    if every < 1:
        reader.close()
        raise UserError(f"--every {every}: expected 1 or more (segment every Nth frame)")
    names = list(names) if names else [f"class {c}" for c in range(len(colors))]
    stem = reader.path.stem
    overlay_path = output / f"{stem}_overlay.mp4"
    finals = [overlay_path] + ([output / f"{stem}_frames"] if save_labels else [])
    try:
        with staged(finals) as temporaries:
            writer = cv2.VideoWriter(str(temporaries[0]), cv2.VideoWriter_fourcc(*FOURCC), reader.fps,
                                     (reader.width, reader.height))
            if not writer.isOpened():
                raise DataError(f"--output {output}: OpenCV cannot write {FOURCC} video to {overlay_path.name}")
            try:
                written, segmented = run_frames(predictor, reader, writer, temporaries[1:], colors, names, every,
                                                alpha)
            finally:
                writer.release()
            if frames_in(temporaries[0]) != written:
                raise DataError(f"--output {output}: writing {overlay_path.name} failed (is the disk full?)")
    finally:
        reader.close()
    if reader.announced and written != reader.announced:
        logger.warning("%s announces %d frames but %d could be decoded; the overlay has %d (the file may be "
                       "damaged or truncated)", reader.path, reader.announced, written, written)
    logger.info("video %s: %d frames, %d segmented (every %d), %dx%d at %g frames/s", reader.path, written,
                segmented, every, reader.width, reader.height, reader.fps)
    return finals


def run_frames(predictor: FramePredictor, reader: VideoReader, writer: cv2.VideoWriter, label_folders: list[Path],
               colors: np.ndarray, names: Sequence[str], every: int, alpha: float) -> tuple[int, int]:
    """Segment, overlay and write every frame; return (frames written, frames segmented)."""
    progress, last_report = Progress(reader.announced), time.perf_counter()
    labels, segmented, done, reported = None, 0, 0, 0
    for done, frame in enumerate(reader, start=1):
        index = done - 1
        if index % every == 0:
            labels = predictor.predict(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32))
            segmented += 1
            for folder in label_folders:
                write_png(folder / f"{index:06d}.png", labels)
        writer.write(overlay_frame(frame, labels, colors, names, alpha))
        if time.perf_counter() - last_report >= REPORT_SECONDS:
            log_progress(progress, done)
            last_report, reported = time.perf_counter(), done
    if reported != done:
        log_progress(progress, done)
    return done, segmented


def log_progress(progress: Progress, done: int) -> None:
    """`frames done/total elapsed ETA, frames/s`; without the ETA when the file records no frame count."""
    counted = progress.line(done) if progress.total >= done else f"{done} frames"
    logger.info("video %s, %.2f frames/s", counted, progress.rate(done))
