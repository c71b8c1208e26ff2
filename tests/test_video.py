"""tool/demo.py --video on a 9-frame clip the test writes with OpenCV: the overlay is H.264 (yuv420p,
+faststart) and keeps the input's frame count, rate and size; frame k's labels equal `demo.py --image`
on frame k and its legend names the classes; --every N segments every Nth frame; bad input is one
line and leaves no output behind (util/video.py). Clips written with PyAV: a 29.97 frames/s rate
(30000/1001) and the audio track come through exactly, and the overlay's colours are not swapped."""
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import assert_one_line_error, run_tool, write_config
from util.errors import DataError, UserError
from util.palette import read_colors, read_names
from util.video import FramesTooLarge, VideoReader, draw_legend, legend_layout, overlay_frame, segment_video

FRAMES, FPS, WIDTH, HEIGHT = 9, 12.0, 64, 48


@pytest.fixture(scope="module")
def clip(tiny_toy, tmp_path_factory) -> Path:
    """clip.mp4: 9 frames of 48x64 (the toy val images resized) at 12 frames/s, coded as mp4v."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    for i in range(FRAMES):
        writer.write(cv2.resize(cv2.imread(str(tiny_toy / "images" / "val" / f"toy_val_{i % 8:05d}.jpg")),
                                (WIDTH, HEIGHT)))
    writer.release()
    return path


@pytest.fixture(scope="module")
def config(tiny_toy, checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cfg")
    return write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(checkpoint), "scales": [1.0]})


def decoded_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def video_properties(path: Path) -> tuple:
    """(video codec, pixel format, exact frame rate, frames, width, height, audio codecs) as PyAV reads them."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        return (video.codec_context.name, video.codec_context.pix_fmt, video.average_rate, video.frames,
                video.width, video.height, [a.codec_context.name for a in container.streams.audio])


def assert_legend_names_the_classes(clip: Path, overlay: Path, labels: Path, tiny_toy: Path) -> None:
    """Frame 4's legend box looks like util/video.py's legend with the config's class names, not like
    one with the fallback names `class k` or none."""
    k, colors = 4, read_colors(str(tiny_toy / "toy_colors.txt"), 6)
    frame, written = decoded_frames(clip)[k], decoded_frames(overlay)[k].astype(np.float32)
    predicted = cv2.imread(str(labels / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED)
    names = read_names(str(tiny_toy / "toy_names.txt"), 6)
    candidates = {"names": names, "class k": [f"class {c}" for c in range(6)], "none": [""] * 6}
    drawn = {key: overlay_frame(frame, predicted, colors, value, 0.5) for key, value in candidates.items()}
    differs = (drawn["names"] != drawn["none"]).any(2) | (drawn["class k"] != drawn["none"]).any(2)
    rows, columns = np.nonzero(differs)  # the legends' text and boxes
    region = (slice(0, rows.max() + 1), slice(0, columns.max() + 1))
    error = {key: np.abs(written[region] - image[region]).mean() for key, image in drawn.items()}
    assert error["names"] < 0.6 * min(error["class k"], error["none"]), error


def test_overlay_keeps_count_rate_and_size_and_labels_equal_the_image_demo(clip, config, tmp_path, tiny_toy):
    out = run_tool("demo.py", f"--config={config}", f"--video={clip}", "--save-labels", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    overlay, labels = tmp_path / "clip_overlay.mp4", tmp_path / "clip_frames"
    assert out.stdout.splitlines()[-2:] == [str(overlay), str(labels)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_frames", "clip_overlay.mp4"]  # no temporaries
    assert video_properties(overlay) == ("h264", "yuv420p", Fraction(FPS), FRAMES, WIDTH, HEIGHT, [])
    data = overlay.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: the index first, so playback starts at once
    assert len(decoded_frames(overlay)) == FRAMES
    assert sorted(p.name for p in labels.iterdir()) == [f"{k:06d}.png" for k in range(FRAMES)]
    assert "9/9" in out.stdout and "frames/s" in out.stdout
    assert_legend_names_the_classes(clip, overlay, labels, tiny_toy)

    k = 5
    cv2.imwrite(str(tmp_path / "frame.png"), decoded_frames(clip)[k])  # PNG: lossless
    out = run_tool("demo.py", f"--config={config}", f"--image={tmp_path / 'frame.png'}", "--output",
                   str(tmp_path / "image"))
    assert out.returncode == 0, out.stderr[-3000:]
    image_labels = cv2.imread(str(tmp_path / "image" / "frame_gray.png"), cv2.IMREAD_UNCHANGED)
    video_labels = cv2.imread(str(labels / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED)
    assert image_labels.shape == (HEIGHT, WIDTH) and (video_labels == image_labels).all()


def test_every_3_segments_a_third_of_the_frames_and_keeps_the_length(clip, config, tmp_path):
    out = run_tool("demo.py", f"--config={config}", f"--video={clip}", "--every", "3", "--save-labels",
                   "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "clip_frames").iterdir()) == ["000000.png", "000003.png",
                                                                          "000006.png"]
    assert "9 frames, 3 segmented (every 3)" in out.stdout
    assert len(decoded_frames(tmp_path / "clip_overlay.mp4")) == FRAMES


class FailingPredictor:
    """Predicts class k % 6 for frame k and fails at frame `fail_at`."""

    def __init__(self, fail_at: int, error: type[BaseException]):
        self.frames, self.fail_at, self.error = 0, fail_at, error

    def predict(self, image: np.ndarray) -> np.ndarray:
        if self.frames == self.fail_at:
            raise self.error("stopped")
        self.frames += 1
        return np.full(image.shape[:2], (self.frames - 1) % 6, np.uint8)


def mjpeg_avi(path: Path, codec: bytes = b"MJPG") -> Path:
    """A 2-frame MJPEG AVI whose codec tag is then replaced by `codec`."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    for value in (0, 255):
        writer.write(np.full((HEIGHT, WIDTH, 3), value, np.uint8))
    writer.release()
    path.write_bytes(path.read_bytes().replace(b"MJPG", codec))
    return path


def bad_video(case: str, folder: Path) -> Path:
    """A --video argument that is not a readable video: `case` says how."""
    video = folder / {"empty": "empty.mp4", "text": "notes.mp4", "codec": "zzzz.avi", "image": "still.png",
                      "missing": "nothing.mp4"}[case]
    if case == "empty":
        video.write_bytes(b"")
    elif case == "text":
        video.write_text("not a video\n" * 50)
    elif case == "codec":
        mjpeg_avi(video, b"ZZZZ")
    elif case == "image":
        cv2.imwrite(str(video), np.zeros((8, 8, 3), np.uint8))
    return video


@pytest.mark.parametrize("case, fragments", [
    ("text", ["notes.mp4", "not a video file"]),
    ("codec", ["zzzz.avi", "AVI file that OpenCV cannot decode"]),
    ("unwritable", ["--output", "is not writable"]),
])
def test_bad_input_is_one_line_and_leaves_no_output(case, fragments, clip, config, tmp_path):
    output = tmp_path / "out"
    video = clip if case == "unwritable" else bad_video(case, tmp_path)
    if case == "unwritable":
        (tmp_path / "file").write_text("a file, not a folder")
        output = tmp_path / "file" / "out"
    out = run_tool("demo.py", f"--config={config}", f"--video={video}", "--save-labels", "--output", str(output))
    assert_one_line_error(out, *fragments)
    assert not output.is_dir() or not any(output.iterdir())


@pytest.mark.parametrize("case, message", [
    ("empty", "empty.mp4: file is empty"),
    ("image", "still.png: is an image; segment it with --image"),
    ("missing", "nothing.mp4: file not found"),
])
def test_more_files_that_are_not_videos_are_named(case, message, tmp_path):
    with pytest.raises(DataError, match=message):
        VideoReader(bad_video(case, tmp_path))


def test_frames_over_the_pixel_limit_are_refused_from_the_header_before_any_decoding(clip, monkeypatch):
    """A few hundred bytes of MJPEG can announce an 8000x8000 frame: decoding it first costs 200 MB."""
    reads = []
    real_capture = cv2.VideoCapture

    class CountingCapture:
        def __init__(self, *args):
            self.capture = real_capture(*args)

        def read(self):
            reads.append(1)
            return self.capture.read()

        def __getattr__(self, name):
            return getattr(self.capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    with pytest.raises(FramesTooLarge, match=f"clip.mp4: the video is {WIDTH}x{HEIGHT} = {WIDTH * HEIGHT} pixels a "
                                             f"frame; at most {WIDTH * HEIGHT - 1}"):
        VideoReader(clip, max_pixels=WIDTH * HEIGHT - 1)
    assert not reads
    assert VideoReader(clip, max_pixels=WIDTH * HEIGHT).width == WIDTH and reads == [1]


def test_every_must_be_positive(clip, tmp_path):
    with pytest.raises(UserError, match="--every 0: expected 1 or more"):
        segment_video(FailingPredictor(0, RuntimeError), VideoReader(clip), tmp_path, np.zeros((6, 3), np.uint8),
                      every=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_part_way_leaves_no_half_written_output_and_keeps_the_last_result(error, clip, tiny_toy,
                                                                                     tmp_path):
    colors = read_colors(str(tiny_toy / "toy_colors.txt"), 6)
    (tmp_path / ".clip_overlay.tmp1.mp4").write_bytes(b"left by a killed run")
    (tmp_path / ".clip_frames.tmp1").mkdir()
    written = segment_video(FailingPredictor(FRAMES, error), VideoReader(clip), tmp_path, colors, save_labels=True)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert written == [tmp_path / "clip_overlay.mp4", tmp_path / "clip_frames"] and len(before) == FRAMES + 2
    with pytest.raises(error):
        segment_video(FailingPredictor(4, error), VideoReader(clip), tmp_path, colors, save_labels=True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_legend_shows_a_swatch_per_class_present_in_class_order():
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    frame = np.full((HEIGHT * 4, WIDTH * 4, 3), 200, np.uint8)
    draw_legend(frame, [0, 2], colors, ["red", "green", "blue"])
    row, margin = legend_layout(frame.shape[0])
    swatch_centres = [frame[margin + i * row + row // 2, margin + row // 2] for i in range(2)]
    assert [c.tolist() for c in swatch_centres] == [[0, 0, 255], [255, 0, 0]]  # BGR of red, then blue
    assert (frame[margin + 2 * row + margin:, :] == 200).all()  # nothing below the two entries


RATE_2997 = Fraction(30000, 1001)
GRAY = 128


def pyav_clip(path: Path, audio_codec: str, frames: int = 6) -> Path:
    """A uniformly gray 64x48 H.264 clip at 30000/1001 frames/s with a 440 Hz tone as `audio_codec`."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=RATE_2997)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = container.add_stream(audio_codec, rate=8000)
        audio.layout = "mono"
        for k in range(frames):
            picture = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), GRAY, np.uint8), format="bgr24")
            picture.pts, picture.time_base = k, 1 / RATE_2997
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        tone = np.sin(np.arange(round(8000 * frames / RATE_2997)) * 2 * np.pi * 440 / 8000) * 0.3
        sound = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="flt", layout="mono")
        sound.sample_rate, sound.pts = 8000, 0
        container.mux(audio.encode(sound))
        container.mux(audio.encode(None))
    return path


class ConstantPredictor:
    def __init__(self, label: int):
        self.label = label

    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], self.label, np.uint8)


@pytest.mark.parametrize("audio_codec, suffix, carried", [("aac", "mp4", "aac"), ("pcm_s16le", "mov", "aac")])
def test_exact_2997_rate_count_size_audio_and_colours_come_through(audio_codec, suffix, carried, tmp_path):
    """29.97 frames/s stays 30000/1001 (not 29 or 30); the audio track is copied (AAC) or re-encoded as AAC
    (PCM, which MP4 cannot hold); class 1 is pure blue in RGB, so red and blue swapped would show."""
    clip = pyav_clip(tmp_path / f"tone.{suffix}", audio_codec)
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)  # RGB: red, blue
    written = segment_video(ConstantPredictor(1), VideoReader(clip), tmp_path / "out", colors, ["red", "blue"],
                            alpha=0.75)
    overlay = written[0]
    assert video_properties(overlay) == ("h264", "yuv420p", RATE_2997, 6, WIDTH, HEIGHT, [carried])
    with av.open(str(overlay)) as container:
        sound = np.concatenate([frame.to_ndarray().ravel() for frame in container.decode(audio=0)])
    assert 0.9 * round(8000 * 6 / RATE_2997) <= sound.size and np.abs(sound).max() > 0.1  # the tone, not silence
    b, g, r = decoded_frames(overlay)[-1][HEIGHT - 8, WIDTH - 8].astype(int)  # away from the legend
    expected = 0.25 * GRAY + 0.75 * np.array([255, 0, 0])  # BGR of blue over gray at opacity 0.75
    assert np.abs(np.array([b, g, r]) - expected).max() <= 12, (b, g, r)
