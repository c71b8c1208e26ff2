"""Evaluate a trained model: multi-scale sliding-window inference with flip, PNG predictions, IoU.

  python tool/test.py --config=config/ade20k/ade20k_pspnet50.yaml [SECTION.key value ...]
  torchrun --nproc_per_node=4 tool/test.py --config=...      (shards the list, same numbers)

Writes save_folder/gray/<name>.png (class ids) and save_folder/color/<name>.png. For splits with
labels: the per-class table, metrics.json (with the confusion matrix) and the report of
util/report.py (per_image.csv, confusion.png, report.html, and vis/ panels image | prediction |
truth | errors of the TEST.report_worst worst images); without labels, vis/ panels of the first
TEST.vis_count images. TEST.submission_format also writes save_folder/submission/ for a benchmark
server. TEST.has_prediction re-scores the PNGs already in save_folder/gray without a model.
TEST.onnx_path runs a file exported by tool/export.py in onnxruntime instead of the checkpoint,
through the same pipeline (util.predictor.Predictor). CUDA when available, else CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import init_data_worker, set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from util.checkpoint import check_writable  # noqa: E402
from util.cli import Progress, removed_if_failed_empty, run_main, setup_logging  # noqa: E402
from util.config import (Config, add_config_arguments, describe_schema, load_config,  # noqa: E402
                         parse_config_args)
from util.dataset import SemSegDataset, dataset_from_config  # noqa: E402
from util.distributed import (DistInfo, barrier, cleanup_distributed, default_workers, gather_to_main,  # noqa: E402
                              init_distributed, local_world_size, shard_indices)
from util.errors import ConfigError, DataError  # noqa: E402
from util.image_io import read_label  # noqa: E402
from util.inference import resize_image  # noqa: E402
from util.metrics import ConfusionMatrix, format_scores_table  # noqa: E402
from util.palette import colorize, output_names, read_colors, read_names, side_by_side, write_png  # noqa: E402
from util.predictor import Predictor  # noqa: E402
from util.report import evaluated_network, image_score, write_evaluation_report  # noqa: E402
from util.submission import check_submission_format, write_submission  # noqa: E402

logger = logging.getLogger("test")


class ScaledImages(Dataset):
    """Decodes an image and resizes it to every test scale inside a data-loader worker."""

    def __init__(self, dataset: SemSegDataset, indices: list[int], long_sizes: list[int]):
        self.dataset, self.indices, self.long_sizes = dataset, indices, long_sizes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image, label, _ = self.dataset.load_raw(index)
        return index, image, label, [resize_image(image, s) for s in self.long_sizes]


def selected_indices(cfg: Config, total: int) -> list[int]:
    """TEST.index_start / index_step: a slice of the list (index_step 0 = to the end)."""
    end = total if cfg.index_step == 0 else min(total, cfg.index_start + cfg.index_step)
    if cfg.index_start >= total:
        raise ConfigError(f"TEST.index_start {cfg.index_start} is past the end of {cfg.test_list} ({total} samples)")
    return list(range(cfg.index_start, end))


def make_loader(cfg: Config, info: DistInfo, images: ScaledImages) -> DataLoader:
    """Images in list order, decoded and scaled by as many workers as training would use
    (TRAIN.workers, capped at the cores), never more than there are images."""
    workers, notice = default_workers(cfg.workers, local_world_size(os.environ))
    if notice and info.is_main:
        logger.warning(notice)
    workers = min(workers, len(images))
    return DataLoader(images, batch_size=None, shuffle=False, num_workers=workers, worker_init_fn=init_data_worker,
                      prefetch_factor=2 if workers > 0 else None, pin_memory=info.device.type == "cuda")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog="config keys:\n" + describe_schema(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parse_config_args(parser)


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.opts)
    info = init_distributed(cfg.dist_backend, cfg.dist_timeout)
    set_process_threads(local_world_size(os.environ))
    with removed_if_failed_empty(Path(cfg.save_folder), own=info.is_main):
        evaluate(args, cfg, info)


def evaluate(args: argparse.Namespace, cfg: Config, info: DistInfo) -> None:
    """Predict (or re-score), then write the scores and the report into TEST.save_folder."""
    save = Path(cfg.save_folder)
    if info.is_main:
        check_writable(save, "TEST.save_folder")
    setup_logging(save / f"test-{time.strftime('%Y%m%d_%H%M%S')}.log" if info.is_main else None, info.is_main)
    if info.is_main:
        cfg.save(save / "config.yaml")
    if not cfg.test_list:
        raise ConfigError("TEST.test_list is not set")
    names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else [str(i) for i in range(cfg.classes)]
    colors = read_colors(cfg.colors_path, cfg.classes) if cfg.colors_path else None
    check_submission_format(cfg.submission_format, cfg.classes)

    dataset = dataset_from_config(cfg, cfg.test_list, cfg.split)
    indices = selected_indices(cfg, len(dataset))
    out_names = output_names([dataset.entries[i].image_path for i in indices], cfg.data_root)
    shard = [indices[k] for k in shard_indices(len(indices), info.rank, info.world_size)]
    name_of = dict(zip(indices, out_names))
    logger.info("evaluating %d of %d images in %s with %d process(es) on %s; scales %s, flip %s",
                len(indices), len(dataset), cfg.test_list, info.world_size, info.device, cfg.scales, cfg.flip)

    matrix = ConfusionMatrix(cfg.classes, cfg.ignore_label, info.device)
    if cfg.has_prediction:
        per_image = rescore_saved_predictions(cfg, dataset, shard, name_of, matrix)
    else:
        per_image = predict_and_save(cfg, info, dataset, shard, indices, name_of, colors, matrix)

    if cfg.split != "test":
        matrix.reduce()
        scores = matrix.compute()
        per_image = gather_to_main(per_image)  # after reduce(): every process has written its PNGs
        if info.is_main:
            logger.info("results on %d images:\n%s", len(indices), format_scores_table(scores, names))
            conf = matrix.mat.cpu().numpy()
            network = {"model_path": None, "onnx_path": None}  # the one that ran, if any
            if not cfg.has_prediction:
                network["onnx_path" if cfg.onnx_path else "model_path"] = cfg.onnx_path or cfg.model_path
            result = {"config": str(args.config), **network, "network": evaluated_network(cfg),
                      "images": len(indices), "scales": cfg.scales, "flip": cfg.flip, **scores.as_dict(names),
                      "confusion": {"rows": "ground truth", "columns": "prediction", "counts": conf.tolist()}}
            (save / "metrics.json").write_text(json.dumps(result, indent=2))
            logger.info("scores written to %s", save / "metrics.json")
            started = time.perf_counter()
            write_evaluation_report(save, cfg, str(args.config), dataset, per_image, conf, scores, names, colors)
            logger.info("report written to %s in %.1f s", save / "report.html", time.perf_counter() - started)
    barrier()
    if info.is_main:
        logger.info("predictions in %s and %s", save / "gray", save / "color")
    cleanup_distributed()


def predict_and_save(cfg, info, dataset, shard, indices, name_of, colors, matrix) -> list:
    """Run the network (TEST.onnx_path, else the checkpoint TEST.model_path) on this process's shard,
    write PNGs and accumulate the confusion matrix; returns the shard's per-image scores
    (util.report.ImageScore; none without labels)."""
    predictor = Predictor.from_config(cfg, device=info.device)
    logger.info("network: %s", evaluated_network(cfg))
    torch.backends.cudnn.benchmark = True  # every window has the same size
    loader = make_loader(cfg, info, ScaledImages(dataset, shard, predictor.long_sizes))
    vis_first = set(indices[:cfg.vis_count])
    progress = Progress(len(shard))
    log_every = max(1, len(shard) // 20)
    per_image = []
    for done, (index, image, label, scaled) in enumerate(loader, start=1):
        probs = predictor.scaled_probabilities(scaled, tuple(image.shape[:2]))
        pred = probs.argmax(0)
        name = name_of[index]
        if label is not None:
            counts = matrix.update(pred, torch.as_tensor(np.asarray(label)).to(info.device))
            per_image.append(image_score(index, name, counts.cpu().numpy()))
        pred = pred.to(torch.uint8).cpu().numpy()
        write_png(Path(cfg.save_folder) / "gray" / f"{name}.png", pred)
        write_submission(Path(cfg.save_folder) / "submission", dataset.entries[index].image_path, name, pred,
                         cfg.submission_format)
        if colors is not None:
            color = colorize(pred, colors)
            write_png(Path(cfg.save_folder) / "color" / f"{name}.png", color)
            if label is None and index in vis_first:  # with labels, vis/ shows the report's worst images
                write_png(Path(cfg.save_folder) / "vis" / f"{name}.png", side_by_side(np.asarray(image), color, None))
        if done % log_every == 0 or done == len(shard):
            logger.info("test %s", progress.line(done))
    return per_image


def rescore_saved_predictions(cfg, dataset, shard, name_of, matrix) -> list:
    """TEST.has_prediction: score save_folder/gray/<name>.png against the labels, no model needed;
    returns the per-image scores and writes the submission files of TEST.submission_format."""
    if cfg.split == "test":
        raise ConfigError("TEST.has_prediction scores saved predictions, which needs labels; TEST.split is test")
    gray = Path(cfg.save_folder) / "gray"
    per_image = []
    for index in shard:
        path = gray / f"{name_of[index]}.png"
        if not path.is_file():
            raise DataError(f"TEST.has_prediction: prediction {path} for {dataset.entries[index].image_path} "
                            "does not exist; run without has_prediction first")
        pred = read_label(str(path))
        _, label, _ = dataset.load_raw(index)
        if pred.shape != label.shape:
            raise DataError(f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but its label is "
                            f"{label.shape[1]}x{label.shape[0]}")
        if pred.max() >= cfg.classes:
            raise DataError(f"prediction {path} holds class {int(pred.max())}, outside 0..{cfg.classes - 1}")
        per_image.append(image_score(index, name_of[index], matrix.update_numpy(pred, label).numpy()))
        write_submission(Path(cfg.save_folder) / "submission", dataset.entries[index].image_path, name_of[index],
                         pred, cfg.submission_format)
    return per_image


if __name__ == "__main__":
    run_main(main)
