"""Serve a trained model as a web page and an HTTP API: upload an image, see its segmentation.

  python tool/serve.py --config=config/toy/toy_pspnet18.yaml              # then open http://127.0.0.1:7860/
  python tool/serve.py --config=config/toy/toy_pspnet18.yaml TEST.onnx_path exp/toy/pspnet18.onnx --port 8000
  curl --data-binary @photo.jpg http://127.0.0.1:7860/predict -o labels.png           # class ids, one byte a pixel
  curl --data-binary @photo.jpg 'http://127.0.0.1:7860/predict?format=json'           # class shares and time

The page takes an image (dropped on it or chosen): the overlay with an opacity slider, a legend of
the classes present with their share of the image, the prediction time and the label and colour
PNGs to download. It also takes a short video and returns the overlay video (util/video.py), with
frames done and an ETA while it runs. The API and its answers are listed in util/web_app.py.

The model is TEST.model_path (a file, or an http(s) URL named with its hash, see
tool/publish_model.py) or the ONNX file TEST.onnx_path, run by util.predictor.Predictor with the
config's test settings (TEST.scales, base_size, the window); colours from TEST.colors_path, names
from TEST.names_path. CUDA when available, else CPU.

Safe by default: the server listens on 127.0.0.1, this machine only; --host 0.0.0.0 opens it to
the network (it has no authentication; the log warns). Uploads and images are limited by the
--max-* options, one network runs at a time (other requests queue, at most --max-queue), and a
refused upload is one line to the client while the server goes on. Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
import uvicorn  # noqa: E402

from util.cli import run_main, setup_logging  # noqa: E402
from util.config import Config, add_config_arguments, load_config, parse_config_args  # noqa: E402
from util.errors import ConfigError, UserError  # noqa: E402
from util.palette import read_colors, read_names  # noqa: E402
from util.predictor import Predictor  # noqa: E402
from util.web_app import Limits, WebDemo  # noqa: E402

logger = logging.getLogger("serve")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # 7860: the port Hugging Face Spaces expect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens the "
                             "server to every machine that can reach this one)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    add_limit_options(parser)
    add_config_arguments(parser)
    return parse_config_args(parser, argv)


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The --max-* options; limits_of reads them."""
    defaults = Limits()
    parser.add_argument("--max-upload-mb", type=float, default=defaults.upload_bytes / 2**20,
                        help="largest image upload in MiB (default %(default)g)")
    parser.add_argument("--max-pixels", type=int, default=defaults.pixels,
                        help="most pixels of an image or a video frame (default %(default)d)")
    parser.add_argument("--max-video-mb", type=float, default=defaults.video_bytes / 2**20,
                        help="largest video upload in MiB (default %(default)g)")
    parser.add_argument("--max-video-frames", type=int, default=defaults.video_frames,
                        help="most frames of a video (default %(default)d)")
    parser.add_argument("--max-queue", type=int, default=defaults.queue,
                        help="requests that may wait for the network before the server answers busy (503) "
                             "(default %(default)d)")


def limits_of(args: argparse.Namespace) -> Limits:
    """The --max-* options, each checked to be positive."""
    values = {"--max-upload-mb": args.max_upload_mb, "--max-pixels": args.max_pixels,
              "--max-video-mb": args.max_video_mb, "--max-video-frames": args.max_video_frames,
              "--max-queue": args.max_queue}
    for option, value in values.items():
        if value <= 0:
            raise UserError(f"{option} {value:g}: expected a positive number")
    return Limits(upload_bytes=int(args.max_upload_mb * 2**20), pixels=args.max_pixels,
                  video_bytes=int(args.max_video_mb * 2**20), video_frames=args.max_video_frames,
                  queue=args.max_queue)


def exposure_warning(host: str) -> str | None:
    """A warning line when `host` lets other machines reach the server, else None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"--host {host}: other machines that can reach this one may use the server, which has no "
            f"authentication; they can upload images and use this machine's CPU or GPU")


def build_demo(cfg: Config, limits: Limits, config_path: str) -> WebDemo:
    """The Predictor of the config with its colours and names, behind the web routes."""
    if not cfg.colors_path:
        raise ConfigError("TEST.colors_path is not set: the demo needs class colours for its overlay")
    colors = read_colors(cfg.colors_path, cfg.classes)
    names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else None
    predictor = Predictor.from_config(cfg)
    model = Path(cfg.onnx_path or cfg.model_path).name
    return WebDemo(predictor, colors, names, limits, title=f"{Path(config_path).stem}: {model}")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one line saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for old connections
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"--host {host} --port {port}: cannot listen there ({reason}); choose another --port, "
                        f"or --port 0 for a free one") from None
    return sock


def main() -> None:
    args = parse_args()
    setup_logging()
    limits = limits_of(args)
    cfg = load_config(args.config, args.opts)
    sock = bind(args.host, args.port)  # a port in use is one line before the model loads, not after
    set_process_threads()
    demo = build_demo(cfg, limits, args.config)
    sock.listen(128)  # connections wait from now on, so the URL works as soon as it is logged
    warning = exposure_warning(args.host)
    if warning:
        logger.warning(warning)
    server = uvicorn.Server(uvicorn.Config(demo.app(), log_config=None, timeout_graceful_shutdown=5))
    interrupted = []

    def interrupt(signum, frame):
        # Ours before uvicorn installs its own handler and again when it re-raises the signal after
        # shutting down: a Ctrl-C at any moment, even during start-up, ends with status 130.
        interrupted.append(signum)
        server.should_exit = True

    signal.signal(signal.SIGINT, interrupt)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("serving %s on http://%s:%d/ (Ctrl-C stops); limits: %s", demo.title, url_host, port, limits)
    server.run(sockets=[sock])
    if interrupted:
        raise KeyboardInterrupt


if __name__ == "__main__":
    run_main(main)
