"""tool/serve.py's web demo and API on a random-weight toy PSPNet, served once for the module on
127.0.0.1 (a free port): the API's PNG equals Predictor.predict, bad uploads are 4xx and the server
goes on, concurrent requests queue for one network, a short video comes back with its frames, and
the page shows the overlay and legend in headless Chromium (skipped without /usr/bin/chromium).
One more test runs the command itself, on its default host and a free port, and stops it."""
import base64
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CPU_ONLY, REPO_ROOT, write_config
from util.config import load_config
from util.errors import UserError
from util.palette import colorize, read_colors
from util.predictor import Predictor
from util.web_app import ServerThread

with pytest.MonkeyPatch.context() as patch:  # importing a tool sets GOMP_SPINCOUNT: keep it from later tests
    patch.setenv("GOMP_SPINCOUNT", "1000")
    from tool.check_web_page import CHROMIUM, check_page
    from tool.serve import DEFAULT_HOST, bind, build_demo, exposure_warning, limits_of, parse_args

MAX_BYTES, MAX_PIXELS, MAX_FRAMES = 64 * 1024, 100 * 100, 8
TIMEOUT = 60  # seconds for one request: a hung server fails the test instead of stalling the suite


class OneAtATime:
    """The Predictor, noting how many of its predict calls ever ran at once; with `hold` set, each
    call lasts at least that many seconds, so that requests sent together would overlap if the
    server let them."""

    def __init__(self, predictor):
        self.predictor, self.hold = predictor, 0.0
        self.running = self.most = self.calls = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, seconds: float):
        self.hold = seconds
        try:
            yield
        finally:
            self.hold = 0.0

    def predict(self, image):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.hold)
            return self.predictor.predict(image)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture(scope="module")
def config(tiny_toy, checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    return write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(checkpoint), "scales": [1.0]})


@pytest.fixture(scope="module")
def server(config):
    """tool/serve.py's demo with its default host and small limits, on a free port."""
    args = parse_args([f"--config={config}", "--port", "0", "--max-upload-mb", str(MAX_BYTES / 2**20),
                       "--max-pixels", str(MAX_PIXELS), "--max-video-frames", str(MAX_FRAMES)])
    demo = build_demo(load_config(args.config, args.opts), limits_of(args), args.config)
    demo.network.predictor = OneAtATime(demo.network.predictor)
    running = ServerThread(demo.app(), args.host, args.port)
    running.demo = demo
    yield running
    running.stop()


def post(url: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, bytes, dict]:
    """(status, body, headers) of a POST, 4xx and 5xx included."""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def toy_image(tiny_toy: Path, index: int) -> Path:
    return tiny_toy / "images" / "val" / f"toy_val_{index:05d}.jpg"


def png_labels(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_api_png_equals_predictor_predict_and_json_gives_the_shares(server, config, tiny_toy):
    predictor = Predictor.from_config(config)
    colors = read_colors(str(tiny_toy / "toy_colors.txt"), 6)
    image = toy_image(tiny_toy, 3)
    expected = predictor.predict(image)
    status, body, headers = post(f"{server.url}/predict", image.read_bytes())
    assert status == 200 and headers["content-type"] == "image/png"
    labels = png_labels(body)
    assert labels.dtype == np.uint8 and labels.shape == expected.shape and (labels == expected).all()
    assert float(headers["x-prediction-seconds"]) > 0
    assert len(np.unique(expected)) > 1  # a real test of equality, not of one class everywhere

    status, body, _ = post(f"{server.url}/predict?format=color", image.read_bytes())
    assert status == 200
    assert (cv2.cvtColor(png_labels(body), cv2.COLOR_BGR2RGB) == colorize(expected, colors)).all()

    status, body, _ = post(f"{server.url}/predict?format=json&images=1", image.read_bytes())
    answer = json.loads(body)
    assert status == 200 and (answer["height"], answer["width"]) == expected.shape and answer["seconds"] > 0
    counts = np.bincount(expected.ravel(), minlength=6)
    assert [c["id"] for c in answer["classes"]] == sorted(np.flatnonzero(counts), key=lambda c: -counts[c])
    for entry in answer["classes"]:
        assert entry["share"] == pytest.approx(counts[entry["id"]] / expected.size, abs=1e-6)
        assert entry["color"] == colors[entry["id"]].tolist()
    assert sum(c["share"] for c in answer["classes"]) == pytest.approx(1, abs=1e-5)
    assert (png_labels(base64.b64decode(answer["label_png"])) == expected).all()
    assert (cv2.cvtColor(png_labels(base64.b64decode(answer["color_png"])), cv2.COLOR_BGR2RGB)
            == colorize(expected, colors)).all()


def mp4(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size)
    for k in range(frames):
        writer.write(np.full((size[1], size[0], 3), 25 * k, np.uint8))
    writer.release()
    return path.read_bytes()


def bad_upload(case: str, tiny_toy: Path, folder: Path) -> tuple[str, bytes, str]:
    """(path and query, body, content type) of an upload the server must refuse."""
    jpeg = toy_image(tiny_toy, 1).read_bytes()
    octets = "application/octet-stream"
    if case == "too many pixels":  # a small file of 120x120 pixels
        return "/predict", cv2.imencode(".png", np.zeros((120, 120, 3), np.uint8))[1].tobytes(), octets
    if case == "too many frames":
        return "/video", mp4(folder / "long.mp4", MAX_FRAMES + 2), octets
    if case == "video too large a frame":
        return "/video", mp4(folder / "wide.mp4", 2, (128, 96)), octets
    return {
        "empty": ("/predict", b"", octets),
        "text": ("/predict", b"not an image\n" * 20, octets),
        "truncated": ("/predict", jpeg[:len(jpeg) // 2], octets),
        "too many bytes": ("/predict", b"\0" * (MAX_BYTES + 1), octets),
        "a form": ("/predict", b"--x\r\n\r\n" + jpeg, "multipart/form-data; boundary=x"),
        "unknown format": ("/predict?format=tiff", jpeg, octets),
        "video that does not decode": ("/video", b"\0\0\0\x18ftypmp42" + b"\0" * 500, octets),
        "image as a video": ("/video", jpeg, octets),
    }[case]


@pytest.mark.parametrize("case, status, fragment", [
    ("empty", 400, "the upload is empty"),
    ("text", 400, "not an image"),
    ("truncated", 400, "corrupt, truncated"),
    ("too many bytes", 413, "--max-upload-mb"),
    ("too many pixels", 413, "120x120 = 14400 pixels"),
    ("a form", 415, "--data-binary"),
    ("unknown format", 400, "format=tiff"),
    ("video that does not decode", 400, "the video upload: "),  # and util/video.py's reason
    ("image as a video", 400, "is an image, not a video"),
    ("too many frames", 413, f"at most {MAX_FRAMES} (--max-video-frames)"),
    ("video too large a frame", 413, "--max-pixels"),
])
def test_a_bad_upload_is_one_4xx_line_and_the_server_goes_on(case, status, fragment, server, tiny_toy, tmp_path):
    path, body, content_type = bad_upload(case, tiny_toy, tmp_path)
    got, answer, _ = post(server.url + path, body, content_type)
    message = json.loads(answer)["error"]
    assert got == status and fragment in message and "\n" not in message, (got, message)
    assert str(tmp_path) not in message and "semseg-serve" not in message  # no server path leaks out
    assert post(f"{server.url}/predict", toy_image(tiny_toy, 2).read_bytes())[0] == 200


def test_unknown_video_jobs_and_paths_are_404(server):
    assert get(f"{server.url}/video/nothing")[0] == 404
    assert get(f"{server.url}/video/..%2F..%2Fetc%2Fpasswd/overlay.mp4")[0] == 404
    assert get(f"{server.url}/etc/passwd")[0] == 404


def test_two_requests_at_once_both_succeed_one_network_at_a_time(server, tiny_toy):
    recorder = server.demo.network.predictor
    bodies = [toy_image(tiny_toy, k).read_bytes() for k in (4, 5)]
    start, results = threading.Barrier(2), [None, None]

    def send(k: int) -> None:
        start.wait(timeout=TIMEOUT)
        results[k] = post(f"{server.url}/predict", bodies[k])

    calls, hold = recorder.calls, 0.3
    threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    begun = time.perf_counter()
    with recorder.holding(hold):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
    assert [r[0] for r in results] == [200, 200]
    assert recorder.calls - calls == 2 and recorder.most == 1
    assert time.perf_counter() - begun >= 2 * hold  # the second waited for the first


def test_bound_to_loopback_by_default_and_other_hosts_warn(server, config):
    assert parse_args([f"--config={config}"]).host == DEFAULT_HOST == "127.0.0.1"
    assert server.address[0] == "127.0.0.1"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "myhost.example"):
        assert "no authentication" in exposure_warning(host)
    with pytest.raises(UserError, match=f"--port {server.address[1]}: cannot listen there"):
        bind("127.0.0.1", server.address[1])
    with pytest.raises(UserError, match="--max-pixels 0: expected a positive number"):
        limits_of(parse_args([f"--config={config}", "--max-pixels", "0"]))


def test_a_video_comes_back_as_an_overlay_video_with_progress(server, tmp_path):
    frames, deadline, seen = 5, time.monotonic() + TIMEOUT, []
    with server.demo.network.predictor.holding(0.15):  # each frame lasts long enough to be seen
        status, body, _ = post(f"{server.url}/video", mp4(tmp_path / "clip.mp4", frames))
        job = json.loads(body)
        assert status == 202 and job["frames_total"] == frames and job["frames_done"] == 0
        while True:
            state = json.loads(get(f"{server.url}/video/{job['job']}")[1])
            seen.append(state)
            if state["state"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert state["state"] == "done", state
    done = [s["frames_done"] for s in seen]
    assert done[-1] == frames and done == sorted(done)
    assert any(0 < s["frames_done"] < frames and s["eta_seconds"] > 0 for s in seen)  # progress and ETA shown
    status, video = get(f"{server.url}/video/{job['job']}/overlay.mp4")
    (tmp_path / "overlay.mp4").write_bytes(video)
    capture = cv2.VideoCapture(str(tmp_path / "overlay.mp4"))
    assert status == 200 and int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    capture.release()


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"needs Debian's chromium ({CHROMIUM})")
def test_the_page_shows_the_overlay_and_the_legend_in_chromium(server, tiny_toy):
    image = toy_image(tiny_toy, 6)
    shares = json.loads(post(f"{server.url}/predict?format=json", image.read_bytes())[1])["classes"]
    state = check_page(server.url + "/", image, timeout=TIMEOUT)
    assert state["error"] == "" and state["overlay"] and state["seconds"] > 0
    assert [line.split(" ")[0] for line in state["legend"]] == [c["name"] for c in shares]
    assert state["legend"][0].endswith(f"{100 * shares[0]['share']:.1f} %")


def test_the_command_serves_on_loopback_and_stops_on_ctrl_c(config):
    """tool/serve.py itself: --port 0 logs the loopback URL it serves, which answers; SIGINT stops it."""
    env = {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tool" / "serve.py"), f"--config={config}",
                                "--port", "0"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline, log = time.monotonic() + TIMEOUT, []
        while not any(" on http://" in line for line in log) and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if select.select([process.stdout], [], [], 1)[0]:
                log.append(process.stdout.readline())
        serving = re.search(r"on (http://127\.0\.0\.1:\d+)/", "".join(log))
        assert serving, "".join(log)[-3000:]
        url = serving.group(1)
        assert json.loads(get(f"{url}/info")[1])["classes"][0]["name"] == "sky"
        assert "WARNING" not in "".join(log)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=TIMEOUT) == 130
    finally:
        process.kill()
        process.communicate()
