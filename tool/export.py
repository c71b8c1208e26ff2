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
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model import load_eval_model  # noqa: E402
from util.checkpoint import check_writable  # noqa: E402
from util.cli import run_main, setup_logging  # noqa: E402
from util.config import add_config_arguments, describe_schema, load_config, parse_config_args  # noqa: E402
from util.errors import ConfigError, UserError  # noqa: E402
from util.onnx_model import TOLERANCE, OnnxNetwork, export_metadata, export_onnx, max_abs_difference  # noqa: E402
from util.palette import read_colors, read_names  # noqa: E402

logger = logging.getLogger("export")
SAMPLE_BATCH = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog="config keys:\n" + describe_schema(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the ONNX file to write, e.g. model.onnx")
    add_config_arguments(parser)
    args = parse_config_args(parser)
    setup_logging()
    cfg = load_config(args.config, args.opts)
    if not cfg.model_path:
        raise ConfigError("TEST.model_path is not set: export needs the checkpoint to export")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the file to write, e.g. {output / 'model.onnx'}")
    check_writable(output.parent, "--output")
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
    if difference > TOLERANCE:
        kept = output.with_name(f"{output.stem}.unverified.onnx")
        os.replace(temporary, kept)
        raise UserError(f"export check failed: onnxruntime differs from PyTorch by {difference:.2e} (more than "
                        f"{TOLERANCE:.0e}) on a batch of {SAMPLE_BATCH}; {output} was not written, the file is "
                        f"kept as {kept} for inspection")
    os.replace(temporary, output)
    logger.info("wrote %s (%.1f MiB): input image N x 3 x %d x %d, output logits; run it with TEST.onnx_path %s "
                "TEST.test_h %d TEST.test_w %d (the window it takes)", output, output.stat().st_size / 2**20,
                cfg.test_h, cfg.test_w, output, cfg.test_h, cfg.test_w)


if __name__ == "__main__":
    run_main(main)
