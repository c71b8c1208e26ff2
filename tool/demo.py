"""Segment one image or a folder of images: gray, colour and overlay PNGs; or a video file.

  python tool/demo.py --config=config/toy/toy_pspnet18.yaml --image=dataset/toy/images/val/toy_val_00000.jpg
  python tool/demo.py --config=config/ade20k/ade20k_pspnet50.yaml --image=photos/ TEST.scales '[1.0]'
  python tool/demo.py --config=config/toy/toy_pspnet18.yaml --video=drive.mp4 --every 5 --save-labels

Uses TEST.model_path (or the ONNX file TEST.onnx_path), TEST.scales, TEST.base_size, the window
TEST.test_h x test_w and TEST.colors_path; writes <output>/<name>_gray.png, _color.png and
_overlay.png and prints each path. The default output is TEST.save_folder/demo for the checkpoint
and TEST.save_folder/demo/<file name>.onnx for an ONNX file, so that neither overwrites the other
(as tool/test.sh puts an export's evaluation in result/<file name>.onnx/). Segmentation goes
through util.predictor.Predictor. CUDA when available (ONNX files run on the CPU), else CPU.
--video writes <output>/<stem>_overlay.mp4: H.264 (yuv420p, +faststart: browsers and slide tools play
it) with the input's frame count, exact frame rate, size and audio, and a legend of the classes
present; with --save-labels also <stem>_frames/<index:06d>.png: see util/video.py. --opacity sets
the weight of the class colours over the picture in the overlays (PNG and video).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
import numpy as np  # noqa: E402

from util.checkpoint import check_writable  # noqa: E402
from util.cli import Progress, run_main, setup_logging  # noqa: E402
from util.config import add_config_arguments, load_config, parse_config_args  # noqa: E402
from util.errors import ConfigError, DataError, UserError  # noqa: E402
from util.image_io import IMAGE_SUFFIXES, read_image_rgb  # noqa: E402
from util.palette import colorize, read_colors, read_names, write_png  # noqa: E402
from util.predictor import Predictor  # noqa: E402
from util.video import VideoReader, segment_video  # noqa: E402

logger = logging.getLogger("demo")


def find_images(path: Path) -> list[Path]:
    """The image itself, or the images directly inside a folder (sorted)."""
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"--image {path}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    if not path.is_file():
        raise DataError(f"--image {path} does not exist")
    return [path]


def default_output(cfg) -> Path:
    """TEST.save_folder/demo, with a folder of its own for each ONNX file (demo/<file name>.onnx)."""
    demo = Path(cfg.save_folder) / "demo"
    return demo / Path(cfg.onnx_path).name if cfg.onnx_path else demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file or a folder of images")
    source.add_argument("--video", help="a video file (OpenCV reads it): writes <stem>_overlay.mp4 (H.264)")
    parser.add_argument("--every", type=int, default=1, help="--video: segment every Nth frame only")
    parser.add_argument("--save-labels", action="store_true", help="--video: also <stem>_frames/<index>.png")
    parser.add_argument("--output", default="",
                        help="output folder (default TEST.save_folder/demo, for an ONNX file demo/<file name>)")
    parser.add_argument("--opacity", "--alpha", type=float, default=0.5, dest="opacity",
                        help="weight of the class colours over the picture in the overlay, 0..1 (default 0.5)")
    add_config_arguments(parser)
    args = parse_config_args(parser)
    setup_logging()
    cfg = load_config(args.config, args.opts)
    if not 0 <= args.opacity <= 1:
        raise UserError(f"--opacity {args.opacity}: expected 0 (picture only) to 1 (class colours only)")
    if not cfg.colors_path:
        raise ConfigError("TEST.colors_path is not set: the demo needs class colours for its PNGs")
    colors = read_colors(cfg.colors_path, cfg.classes)
    video = VideoReader(Path(args.video)) if args.video else None
    images = [] if video else find_images(Path(args.image))
    output = Path(args.output or default_output(cfg))
    check_writable(output, "--output")

    set_process_threads()
    predictor = Predictor.from_config(cfg)
    if video:
        names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else None
        for path in segment_video(predictor, video, output, colors, names, args.every, args.save_labels, args.opacity):
            print(path)
    progress = Progress(len(images))
    for done, path in enumerate(images, start=1):
        image = read_image_rgb(str(path))
        pred = predictor.predict(image)
        color = colorize(pred, colors)
        overlay = (image * (1 - args.opacity) + color * args.opacity).clip(0, 255).astype(np.uint8)
        for suffix, array in (("gray", pred), ("color", color), ("overlay", overlay)):
            out = output / f"{path.stem}_{suffix}.png"
            write_png(out, array)
            print(out)
        if len(images) > 1:
            logger.info("demo %s", progress.line(done))


if __name__ == "__main__":
    run_main(main)
