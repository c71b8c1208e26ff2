"""Segment a video file frame by frame: an overlay video with a colour legend, and gray label PNGs.

    from util.video import VideoReader, segment_video
    written = segment_video(predictor, VideoReader(Path("drive.mp4")), Path("out"), colors, names, save_labels=True)

OpenCV decodes the input's frames (the FFmpeg inside the opencv-python wheel). PyAV (the FFmpeg and
libx264 of its wheel) reads the input's exact frame rate, a fraction such as 30000/1001, and writes
<output>/<stem>_overlay.mp4 as H.264, yuv420p, with the index at the front (+faststart), so that
browsers and slide tools play it, with the input's frame count, frame rate and size; the input's
first audio track is copied over unchanged (re-encoded as AAC if MP4 cannot hold its codec). A
frame of odd width or height cannot be 4:2:0 and is written 4:4:4 (exact size; players such as VLC
take it, browsers do not). Each overlay frame carries a legend of the classes present in its
segmentation. With save_labels, <output>/<stem>_frames/<index:06d>.png
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
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import av
import cv2
import numpy as np

from util.cli import Progress, debug_enabled
from util.errors import DataError, UserError
from util.image_io import IMAGE_SUFFIXES
from util.palette import colorize, write_png

logger = logging.getLogger(__name__)
DEFAULT_FPS = 25.0  # for the rare file that records no frame rate
# Audio codecs an MP4 file holds as they are; any other track is re-encoded as AAC.
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "opus", "flac", "alac"}
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


class FramesTooLarge(DataError):
    """A video whose frames exceed the pixel limit its reader was given, found from the header."""


class VideoReader:
    """The frames of a video file (BGR uint8), its exact frame rate (`rate`, a Fraction; `fps` as a
    float), size, announced frame count and whether it has an audio track (`audio`).

    Opening fails with one DataError naming the file: missing, empty, an image, not a video, or a
    video whose codec OpenCV's FFmpeg cannot decode (the first frame is decoded to find out).
    `max_pixels` (0: no limit) refuses frames larger than that from the header, before any frame
    is decoded: a small file can hold a huge frame."""

    def __init__(self, path: Path, max_pixels: int = 0):
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
            # From the header before decoding; a header that records no size is checked on the first frame.
            self.refuse_larger_than(max_pixels, int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                                    int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            ok, self.first = self.capture.read()
        self.fourcc = fourcc_text(self.capture.get(cv2.CAP_PROP_FOURCC))
        if not ok:
            self.capture.release()
            raise DataError(f"{where}: no frame could be decoded (codec {self.fourcc}): the file is damaged or "
                            f"OpenCV's FFmpeg lacks the codec")
        self.height, self.width = self.first.shape[:2]
        self.refuse_larger_than(max_pixels, self.width, self.height)
        self.announced = max(int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)  # 0: not recorded
        recorded, self.audio = probe(path)
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        # The exact fraction (29.97 is 30000/1001): a float rate drifts from the input's timing.
        self.rate = recorded or (Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(DEFAULT_FPS))
        self.fps = float(self.rate)
        if not recorded and fps <= 0:
            logger.warning("%s records no frame rate; the overlay uses %g frames/s", path, DEFAULT_FPS)

    def refuse_larger_than(self, max_pixels: int, width: int, height: int) -> None:
        if max_pixels and width * height > max_pixels:
            self.capture.release()
            raise FramesTooLarge(f"--video {self.path}: the video is {width}x{height} = {width * height} pixels a "
                                 f"frame; at most {max_pixels}")

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


def probe(path: Path) -> tuple[Fraction | None, bool]:
    """(the video's exact frame rate or None, whether it has an audio track), as PyAV reads them."""
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            rate = video.average_rate or video.guessed_rate
            return (Fraction(rate) if rate else None), bool(container.streams.audio)
    except (av.FFmpegError, IndexError):  # OpenCV read it; its rate will do
        return None, False


class H264Writer:
    """BGR frames into an H.264 MP4 (yuv420p, +faststart) at an exact frame rate, with the first audio
    track of `audio_from` when given. `write` each frame, then `finish`; `close` in any case."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction, audio_from: Path | None = None):
        self.container = av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"})
        self.video = self.container.add_stream("libx264", rate=rate)
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"  # 4:2:0 needs even sizes
        self.time_base, self.frames = 1 / rate, 0
        # Streams must all exist before the first packet is written, so the audio track is set up now.
        self.source = av.open(str(audio_from)) if audio_from else None
        self.audio_in = self.source.streams.audio[0] if self.source and self.source.streams.audio else None
        self.audio_out = None
        if self.audio_in is not None:
            if self.audio_in.codec_context.name in MP4_AUDIO:
                self.audio_out = self.container.add_stream_from_template(self.audio_in)
            else:
                self.audio_out = self.container.add_stream("aac", rate=self.audio_in.rate)
                self.audio_out.layout = self.audio_in.layout

    def write(self, frame: np.ndarray) -> None:
        picture = av.VideoFrame.from_ndarray(frame, format="bgr24")
        picture.pts, picture.time_base = self.frames, self.time_base  # frame k at k / rate exactly
        self.container.mux(self.video.encode(picture))
        self.frames += 1

    def finish(self) -> None:
        """Flush the encoder and write the audio track: copied packet by packet, or re-encoded as AAC."""
        self.container.mux(self.video.encode(None))
        if self.audio_in is None:
            return
        if self.audio_in.codec_context.name in MP4_AUDIO:
            for packet in self.source.demux(self.audio_in):
                if packet.dts is not None:  # the demuxer's empty flush packet
                    packet.stream = self.audio_out
                    self.container.mux(packet)
        else:
            for sound in self.source.decode(self.audio_in):
                sound.pts = None  # the encoder counts samples itself
                self.container.mux(self.audio_out.encode(sound))
            self.container.mux(self.audio_out.encode(None))

    def close(self) -> None:
        self.container.close()
        if self.source:
            self.source.close()


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
    try:
        with av.open(str(path)) as container:
            return max(container.streams.video[0].frames, 0)
    except (av.FFmpegError, IndexError):
        return 0


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
        output.mkdir(parents=True, exist_ok=True)
        with staged(finals) as temporaries:
            writer = H264Writer(temporaries[0], reader.width, reader.height, reader.rate,
                                reader.path if reader.audio else None)
            try:
                written, segmented = run_frames(predictor, reader, writer, temporaries[1:], colors, names, every,
                                                alpha)
                writer.finish()
            finally:
                writer.close()
            if frames_in(temporaries[0]) != written:
                raise DataError(f"--output {output}: writing {overlay_path.name} failed (is the disk full?)")
    finally:
        reader.close()
    if reader.announced and written != reader.announced:
        logger.warning("%s announces %d frames but %d could be decoded; the overlay has %d (the file may be "
                       "damaged or truncated)", reader.path, reader.announced, written, written)
    logger.info("video %s: %d frames, %d segmented (every %d), %dx%d at %s frames/s (%g), H.264%s", reader.path,
                written, segmented, every, reader.width, reader.height, reader.rate, reader.fps,
                " with the input's audio" if reader.audio else "")
    return finals


def run_frames(predictor: FramePredictor, reader: VideoReader, writer: H264Writer, label_folders: list[Path],
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
