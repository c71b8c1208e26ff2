"""tool/demo.py --video on a 9-frame clip the test writes with OpenCV: the overlay keeps the input's
frame count, rate and size; frame k's labels equal `demo.py --image` on frame k; --every N segments
every Nth frame; bad input is one line and leaves no output behind (util/video.py)."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import assert_one_line_error, run_tool, write_config
from util.errors import DataError, UserError
from util.palette import read_colors
from util.video import VideoReader, draw_legend, legend_layout, segment_video

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


def test_overlay_keeps_count_rate_and_size_and_labels_equal_the_image_demo(clip, config, tmp_path):
    out = run_tool("demo.py", f"--config={config}", f"--video={clip}", "--save-labels", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    overlay, labels = tmp_path / "clip_overlay.mp4", tmp_path / "clip_frames"
    assert out.stdout.splitlines()[-2:] == [str(overlay), str(labels)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_frames", "clip_overlay.mp4"]  # no temporaries
    capture = cv2.VideoCapture(str(overlay))
    assert capture.get(cv2.CAP_PROP_FPS) == FPS
    assert len(decoded_frames(overlay)) == FRAMES
    assert decoded_frames(overlay)[0].shape == (HEIGHT, WIDTH, 3)
    assert sorted(p.name for p in labels.iterdir()) == [f"{k:06d}.png" for k in range(FRAMES)]
    assert "9/9" in out.stdout and "frames/s" in out.stdout

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
