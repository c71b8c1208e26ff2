"""The web demo and HTTP API of a Predictor (tool/serve.py): one page, POST /predict, video jobs.

    GET  /                      the page (util/web_page.html)
    GET  /info                  class names and colours, the limits
    POST /predict               body: an image file. ?format=png (default) the class-id PNG,
                                color the colour PNG, json the class shares and the time
                                (&images=1 adds both PNGs, base64)
    POST /video                 body: a video file. 202 {"job": token}
    GET  /video/<token>         {"state", "frames_done", "frames_total", "eta_seconds", "error"}
    GET  /video/<token>/overlay.mp4

Uploads are the request body itself (curl --data-binary @photo.jpg), read in chunks up to the
size limit: a larger one is refused (413) before the rest arrives. The image's size is read from
its header and checked against the pixel limit before it is decoded. Nothing the client sends
names a file on the server: the only name a client gives is a video job's token, looked up in a table.
A refused upload is HTTP 4xx with {"error": one line}; the server goes on serving. Starlette
(the toolkit FastAPI is built on) and uvicorn serve it; util/web_queue.py runs the network.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from util.errors import DataError
from util.image_io import decode_image_rgb
from util.palette import colorize
from util.web_queue import NetworkQueue, Refused, VideoJobs

PAGE = Path(__file__).with_name("web_page.html")
FORMATS = ("png", "color", "json")


@dataclass(frozen=True)
class Limits:
    """What one request may send (tool/serve.py's --max-* options)."""
    upload_bytes: int = 10 * 2**20
    pixels: int = 4_000_000
    video_bytes: int = 50 * 2**20
    video_frames: int = 300
    queue: int = 8


def class_shares(labels: np.ndarray, colors: np.ndarray, names: Sequence[str] | None) -> list[dict]:
    """The classes present, largest first: id, name, RGB colour and share of the image's pixels."""
    counts = np.bincount(labels.ravel(), minlength=len(colors))
    present = sorted(np.flatnonzero(counts), key=lambda c: -counts[c])
    return [{"id": int(c), "name": names[c] if names else f"class {c}",
             "color": colors[c].tolist(),
             "share": round(float(counts[c]) / labels.size, 6)} for c in present]


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit PNG of class ids (H x W) or of an RGB image (H x W x 3)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array)
    if not ok:
        raise DataError("could not encode the PNG")
    return data.tobytes()


def image_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding its pixels; None for no image."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except Image.DecompressionBombError:
        raise Refused(413, f"the image has far more than {max_pixels} pixels (--max-pixels)") from None
    except Exception:  # Pillow raises several kinds for data that is no image it knows
        return None


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """The uploaded image as float32 RGB; Refused when it is no image or has too many pixels."""
    size = image_size(data, max_pixels)
    if size is None:
        raise Refused(400, "the upload is not an image this server can read (JPEG, PNG, BMP, TIFF or WebP)")
    width, height = size
    if width * height > max_pixels:
        raise Refused(413, f"the image is {width}x{height} = {width * height} pixels; this server takes at most "
                           f"{max_pixels} (--max-pixels)")
    try:
        return decode_image_rgb(data, "upload")
    except DataError:
        raise Refused(400, "the image cannot be decoded: it is corrupt, truncated, or in a format OpenCV does "
                           "not read (send JPEG or PNG)") from None


async def read_upload(request: Request, limit: int, option: str) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, or (400) when empty."""
    too_big = f"the upload is larger than {limit / 2**20:g} MiB, the most this server takes ({option})"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, too_big)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, "send the file itself as the request body (curl --data-binary @photo.jpg), "
                           "not as a form")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, too_big)
        chunks.append(chunk)
    if size == 0:
        raise Refused(400, "the upload is empty: send an image or video file as the request body")
    return b"".join(chunks)


class WebDemo:
    """The routes over one NetworkQueue and one VideoJobs, with the class colours and names."""

    def __init__(self, predictor, colors: np.ndarray, names: Sequence[str] | None, limits: Limits,
                 title: str = ""):
        self.colors, self.names, self.limits, self.title = colors, names, limits, title
        self.network = NetworkQueue(predictor, limits.queue)
        self.videos = VideoJobs(self.network, colors, names, limits.pixels, limits.video_frames, limits.queue)
        self.page = PAGE.read_text(encoding="utf-8")

    def app(self) -> Starlette:
        routes = [Route("/", self.index), Route("/info", self.info), Route("/predict", self.predict, methods=["POST"]),
                  Route("/video", self.start_video, methods=["POST"]), Route("/video/{token}", self.video_status),
                  Route("/video/{token}/overlay.mp4", self.video_overlay)]
        return Starlette(routes=routes, exception_handlers={Refused: refused_response}, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        yield
        await run_in_threadpool(self.close)

    def close(self) -> None:
        self.videos.close()
        self.network.close()

    async def index(self, _: Request) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def info(self, _: Request) -> JSONResponse:
        names = self.names or [f"class {c}" for c in range(len(self.colors))]
        return JSONResponse({"title": self.title, "classes": [{"id": c, "name": name, "color": self.colors[c].tolist()}
                                                              for c, name in enumerate(names)],
                             "limits": asdict(self.limits)})

    async def predict(self, request: Request) -> Response:
        answer = request.query_params.get("format", "png")
        if answer not in FORMATS:
            raise Refused(400, f"format={answer}: expected one of {', '.join(FORMATS)}")
        data = await read_upload(request, self.limits.upload_bytes, "--max-upload-mb")
        image = await run_in_threadpool(decode_upload, data, self.limits.pixels)
        labels, seconds = await asyncio.wrap_future(self.network.submit(image))
        headers = {"X-Prediction-Seconds": f"{seconds:.4f}"}
        if answer == "png":
            return Response(png_bytes(labels), media_type="image/png", headers=headers)
        color = colorize(labels, self.colors)
        if answer == "color":
            return Response(png_bytes(color), media_type="image/png", headers=headers)
        body = {"width": labels.shape[1], "height": labels.shape[0], "seconds": round(seconds, 4),
                "classes": class_shares(labels, self.colors, self.names)}
        if request.query_params.get("images") == "1":
            body["label_png"] = base64.b64encode(png_bytes(labels)).decode()
            body["color_png"] = base64.b64encode(png_bytes(color)).decode()
        return JSONResponse(body, headers=headers)

    async def start_video(self, request: Request) -> JSONResponse:
        data = await read_upload(request, self.limits.video_bytes, "--max-video-mb")
        if image_size(data, self.limits.pixels) is not None:  # FFmpeg would read it as a one-frame video
            raise Refused(400, "the upload is an image, not a video: drop it on the page as an image "
                               "(or POST it to /predict)")
        job = await run_in_threadpool(self.videos.start, data)
        return JSONResponse({"job": job.token, **job.status()}, status_code=202)

    async def video_status(self, request: Request) -> JSONResponse:
        return JSONResponse(self.videos.get(request.path_params["token"]).status())

    async def video_overlay(self, request: Request) -> FileResponse:
        job = self.videos.get(request.path_params["token"])
        if job.state != "done":
            raise Refused(409, f"the video is {job.state}, not done")
        return FileResponse(job.overlay, media_type="video/mp4", filename="overlay.mp4")


async def refused_response(_: Request, refused: Refused) -> JSONResponse:
    return JSONResponse({"error": str(refused)}, status_code=refused.status)


class ServerThread:
    """A uvicorn server in a background thread (the tests, tool/check_web_page.py); stop() ends it."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 30):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not start on {host}:{port}")
            time.sleep(0.02)
        self.address = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{self.address[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
