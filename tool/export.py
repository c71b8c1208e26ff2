"""Export the network of TEST.model_path to ONNX and check the file in onnxruntime against PyTorch.

  python tool/export.py --config=config/toy/toy_pspnet18.yaml --output exp/toy/pspnet18.onnx
  python tool/export.py --config=config/ade20k/ade20k_psanet50.yaml --output psanet50.onnx TEST.model_path m.pth

The checkpoint is loaded strictly, as tool/test.py loads it, and exported in eval mode with
torch.onnx's dynamo-based exporter (opset 18, no custom domains). Input `image`: the normalised
float32 N x 3 x TEST.test_h x TEST.test_w window, any batch size N; output `logits`: the
network's class scores. The file's metadata holds the classes, window, mean/std, class names and
colours and the test settings. The file is then run in onnxruntime (CPU) on a batch of 2 and
compared with PyTorch: the export fails above a max abs difference of 1e-3 and the file is kept
as <output stem>.unverified.onnx for inspection. Run it with TEST.onnx_path (and the window's
TEST.test_h / test_w) in tool/test.py and tool/demo.py, or with util.predictor.Predictor.from_onnx.
Options may come before or after the overrides.

--int8 writes a static int8 (QDQ) file instead, with onnxruntime's quantization tools, calibrated on
--calibration-images images of --calibration (a list file or a folder; default DATA.train_list) cut
into windows as inference cuts them (util/quantize.py). It is then checked by its predictions: on
--check-images images of --check-list (default TEST.test_list) that were not calibration images,
the share of pixels whose class equals the float32 network's, and both mIoUs when the list has
labels. Below --min-agreement nothing is written. The file's metadata adds `precision`,
`quantization` and `check`; it runs wherever the float32 file runs.
  python tool/export.py --config=config/toy/toy_pspnet18.yaml --output exp/toy/pspnet18.int8.onnx --int8
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
import torch  # noqa: E402

from model import load_eval_model  # noqa: E402
from util.checkpoint import check_writable  # noqa: E402
from util.cli import run_main, setup_logging  # noqa: E402
from util.config import add_config_arguments, describe_schema, load_config, parse_config_args  # noqa: E402
from util.errors import ConfigError, UserError  # noqa: E402
from util.onnx_model import TOLERANCE, OnnxNetwork, export_metadata, export_onnx, max_abs_difference  # noqa: E402
from util.palette import read_colors, read_names  # noqa: E402
from util.predictor import Predictor  # noqa: E402
from util.quantize import (DEFAULT_CALIBRATION_IMAGES, DEFAULT_CHECK_IMAGES, MIN_AGREEMENT, WindowReader,  # noqa: E402
                           check_agreement, evenly_spaced, held_out, list_images, list_split, quantize_int8,
                           set_metadata)
from util.dataset import dataset_from_config  # noqa: E402

logger = logging.getLogger("export")
SAMPLE_BATCH = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog="config keys:\n" + describe_schema(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the ONNX file to write, e.g. model.onnx")
    parser.add_argument("--int8", action="store_true",
                        help="write a static int8 (QDQ) file, checked by its predictions")
    parser.add_argument("--calibration", default="",
                        help="--int8: list file or image folder to calibrate on (default DATA.train_list)")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                        help=f"--int8: images to calibrate on, spread over the list (default "
                             f"{DEFAULT_CALIBRATION_IMAGES})")
    parser.add_argument("--check-list", default="",
                        help="--int8: list file of held-out images to check on (default TEST.test_list)")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES,
                        help=f"--int8: held-out images to check on (default {DEFAULT_CHECK_IMAGES})")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                        help=f"--int8: least share of pixels whose class equals the float32 network's "
                             f"(default {MIN_AGREEMENT})")
    add_config_arguments(parser)
    args = parse_config_args(parser)
    setup_logging()
    cfg = load_config(args.config, args.opts)
    set_process_threads()  # onnxruntime's threads follow PyTorch's (util/onnx_model.py)
    if not cfg.model_path:
        raise ConfigError("TEST.model_path is not set: export needs the checkpoint to export")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the file to write, e.g. {output / 'model.onnx'}")
    check_writable(output.parent, "--output")
    int8 = int8_plan(args, cfg) if args.int8 else None
    names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else [str(i) for i in range(cfg.classes)]
    colors = read_colors(cfg.colors_path, cfg.classes).tolist() if cfg.colors_path else None

    model = load_eval_model(cfg, torch.device("cpu"))
    sample = torch.randn(SAMPLE_BATCH, 3, cfg.test_h, cfg.test_w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(sample)  # a window the network cannot take (compact PSA) fails here with its own message
    logger.info("exporting %s-%d (%d classes) from %s for %dx%d windows (ResNet-50: about a minute)",
                "PSPNet" if cfg.arch == "psp" else "PSANet", cfg.layers, cfg.classes, cfg.model_path,
                cfg.test_h, cfg.test_w)
    start = time.perf_counter()
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        export_onnx(model, temporary, sample, export_metadata(cfg, names, colors, cfg.model_path))
        logger.info("exported in %.0f s; checking it in onnxruntime on a batch of %d", time.perf_counter() - start,
                    SAMPLE_BATCH)
        difference = max_abs_difference(model, OnnxNetwork(temporary, "--output"), sample)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.info("onnxruntime vs PyTorch: max abs logit difference %.2e (limit %.0e)", difference, TOLERANCE)
    if not difference <= TOLERANCE:  # NaN too: a diverged checkpoint's logits match nothing
        kept = output.with_name(f"{output.stem}.unverified.onnx")
        os.replace(temporary, kept)
        found = (f"onnxruntime differs from PyTorch by {difference:.2e} (more than {TOLERANCE:.0e})"
                 if math.isfinite(difference) else "the logits are not finite (NaN or inf; a diverged checkpoint?)")
        raise UserError(f"export check failed: {found} on a batch of {SAMPLE_BATCH}; {output} was not written, "
                        f"the file is kept as {kept} for inspection")
    if int8:
        try:
            quantize_checked(temporary, output, cfg, int8)
        finally:
            temporary.unlink(missing_ok=True)
    else:
        os.replace(temporary, output)
    logger.info("wrote %s (%s, %.1f MiB): input image N x 3 x %d x %d, output logits; run it with TEST.onnx_path %s "
                "TEST.test_h %d TEST.test_w %d (the window it takes)", output, "int8" if int8 else "float32",
                output.stat().st_size / 2**20,
                cfg.test_h, cfg.test_w, output, cfg.test_h, cfg.test_w)


def int8_plan(args: argparse.Namespace, cfg) -> dict:
    """The calibration images and the held-out check images of --int8, checked before the export."""
    for option, value in (("--calibration-images", args.calibration_images), ("--check-images", args.check_images)):
        if value < 1:
            raise UserError(f"{option} {value}: expected 1 or more")
    if not 0 < args.min_agreement <= 1:
        raise UserError(f"--min-agreement {args.min_agreement}: expected a share in (0, 1], e.g. 0.98")
    source = args.calibration or cfg.train_list
    option = "--calibration" if args.calibration else "--calibration (default DATA.train_list)"
    images = list_images(Path(source), cfg.data_root, option, cfg.allow_unsafe_paths)
    calibration = evenly_spaced(images, args.calibration_images)
    check_list = args.check_list or cfg.test_list
    dataset = dataset_from_config(cfg, check_list, list_split(Path(check_list)))
    indices = held_out(dataset, calibration)
    if not indices:
        raise UserError(f"--check-list {check_list}: every image in it is a calibration image; the check needs "
                        f"held-out images (give --calibration or --check-list another list)")
    return {"calibration": calibration, "calibration_source": source, "dataset": dataset,
            "indices": evenly_spaced(indices, args.check_images), "check_list": check_list,
            "min_agreement": args.min_agreement}


def quantize_checked(fp32_path: Path, output: Path, cfg, plan: dict) -> None:
    """Quantize the checked float32 file to `output` and check its predictions against it; below the
    agreement threshold nothing is written."""
    fp32 = Predictor.from_onnx(fp32_path)
    reader = WindowReader(plan["calibration"], fp32.long_sizes, fp32.window, fp32.stride_rate,
                          fp32.network.input_name)
    logger.info("int8: calibrating on %d images of %s, cut into %dx%d windows at scales %s",
                len(plan["calibration"]), plan["calibration_source"], *fp32.window, cfg.scales)
    temporary = output.with_name(f".{output.name}.int8.tmp{os.getpid()}")
    try:
        start = time.perf_counter()
        quantization = quantize_int8(fp32_path, temporary, reader, {"calibration_list": plan["calibration_source"],
                                                                     "calibration_images": len(plan["calibration"])})
        logger.info("int8: quantized in %.0f s (%d calibration windows, %s kept in float); checking its "
                    "predictions on %d held-out images of %s", time.perf_counter() - start,
                    quantization["calibration_windows"], ", ".join(quantization["float_nodes"]),
                    len(plan["indices"]), plan["check_list"])
        int8 = Predictor.from_onnx(temporary)
        check = check_agreement(fp32, int8, plan["dataset"], plan["indices"])
        check.update({"list": plan["check_list"], "min_agreement": plan["min_agreement"],
                      "against": "the float32 export of the same checkpoint"})
        logger.info("int8 vs float32: %.2f%% of %d pixels agree (limit %.2f%%)%s", 100 * check["agreement"],
                    check["pixels"], 100 * plan["min_agreement"],
                    f"; mIoU {check['miou_fp32']:.4f} float32, {check['miou_int8']:.4f} int8"
                    if "miou_int8" in check else "")
        if check["agreement"] < plan["min_agreement"]:
            raise UserError(f"int8 check failed: {100 * check['agreement']:.2f}% of the pixels of {check['images']} "
                            f"held-out images agree with float32, below --min-agreement {plan['min_agreement']}; "
                            f"{output} was not written")
        set_metadata(temporary, {**int8.network.metadata, "check": check})
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


if __name__ == "__main__":
    run_main(main)
