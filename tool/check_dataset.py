"""Check a whole dataset before a long run: every list line, image and label, and the class balance.

    python tool/check_dataset.py --config=config/ade20k/ade20k_pspnet50.yaml
    python tool/check_dataset.py --config=config/custom/custom_pspnet18.yaml --split val --max-listed 20
    python tool/check_dataset.py --config=my.yaml --workers 8 DATA.data_root /data/mine

Every sample of DATA.train_list and DATA.val_list is read as training reads it: the image
decoded, the label decoded, remapped (DATA.reduce_zero_label / DATA.label_map) and checked
against DATA.classes and the ignore label, and both sizes compared. Problems are grouped by type
with at most --max-listed files each; a per-class pixel histogram follows (names from
TEST.names_path). Exit status: 0 clean, 1 problems found, 2 the config or a list file itself is
unusable. Options go before the `KEY VALUE` overrides.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import map_with_progress, run_main  # noqa: E402
from util.config import Config, add_config_arguments, load_config, parse_config_args  # noqa: E402
from util.dataset import SemSegDataset, dataset_from_config  # noqa: E402
from util.errors import ConfigError, DataError  # noqa: E402
from util.palette import read_colors, read_names  # noqa: E402

# (text in a DataError message, problem type); the first match wins.
PROBLEM_TYPES = (
    ("file not found", "missing file"),
    ("file is empty", "unreadable file"),
    ("cannot be read", "unreadable file"),
    ("cannot be decoded", "unreadable file"),
    ("channels", "label not single-channel 8-bit"),
    ("-bit", "label not single-channel 8-bit"),
    ("are outside", "label values out of range"),
    ("same size", "image and label sizes differ"),
)
NAMES_PROBLEM = "class names / colours file"


def problem_type(message: str) -> str:
    return next((kind for text, kind in PROBLEM_TYPES if text in message), "other data problem")


class SampleResult(NamedTuple):
    """One sample's outcome: label value counts (256, after remapping) and size, or a problem."""
    counts: np.ndarray | None
    size: tuple[int, int] | None  # (height, width)
    problem: str | None


_worker_dataset: SemSegDataset | None = None


def _init_worker(dataset: SemSegDataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def check_sample(index: int) -> SampleResult:
    try:
        image, label, _ = _worker_dataset.load_raw(index)
    except DataError as exc:
        return SampleResult(None, None, str(exc))
    return SampleResult(np.bincount(label.ravel(), minlength=256), image.shape[:2], None)


@dataclass
class ListReport:
    """What one list file holds: per-value pixel counts, images per value, sizes, problems."""
    name: str
    samples: int = 0
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    images_with: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, result: SampleResult) -> None:
        if result.problem is not None:
            self.problems.setdefault(problem_type(result.problem), []).append(result.problem)
            return
        self.pixels += result.counts
        self.images_with += result.counts > 0
        self.sizes.append(result.size)


def check_list(name: str, dataset: SemSegDataset, workers: int) -> ListReport:
    """Read every sample of one list (in `workers` processes when > 1), reporting progress."""
    report = ListReport(name, samples=len(dataset))
    for result in map_with_progress(check_sample, range(len(dataset)), workers, f"{name}:",
                                    initializer=_init_worker, initargs=(dataset,)):
        report.add(result)
    return report


def format_histogram(report: ListReport, names: list[str], ignore_label: int) -> list[str]:
    """Per-class pixels, share of labelled pixels and number of images containing the class."""
    classes = len(names)
    labelled = int(report.pixels[:classes].sum())
    width = max(len(n) for n in names + ["(ignored)"])
    lines = [f"  {'id':>4} {'class':<{width}} {'pixels':>15} {'share':>7} {'images':>7}"]
    for class_id, class_name in enumerate(names):
        pixels = int(report.pixels[class_id])
        share = 100.0 * pixels / labelled if labelled else 0.0
        lines.append(f"  {class_id:>4} {class_name:<{width}} {pixels:>15,} {share:>6.2f}% "
                     f"{int(report.images_with[class_id]):>7}")
    lines.append(f"  {ignore_label:>4} {'(ignored)':<{width}} {int(report.pixels[ignore_label]):>15,} "
                 f"{'':>7} {int(report.images_with[ignore_label]):>7}")
    unseen = [f"{i} ({names[i]})" for i in range(classes) if report.pixels[i] == 0]
    if unseen and report.sizes:
        lines.append(f"  warning: classes with no pixels in {report.name}: {', '.join(unseen)}")
    return lines


def format_sizes(sizes: list[tuple[int, int]]) -> str:
    if not sizes:
        return "no readable samples"
    heights, widths = zip(*sizes)
    return f"image sizes (WxH) {min(widths)}x{min(heights)} .. {max(widths)}x{max(heights)}"


def crop_warning(report: ListReport, cfg: Config) -> str | None:
    """Training crops of a list where no image is as large as the crop: at scale 1 every crop holds
    padding (image mean, label ignore) around a whole image, so the network sees mostly padding."""
    if report.name != "train" or not report.sizes:
        return None
    if any(h >= cfg.train_h and w >= cfg.train_w for h, w in report.sizes):
        return None
    largest = max(report.sizes, key=lambda size: size[0] * size[1])
    return (f"the training crop TRAIN.train_h x train_w {cfg.train_h}x{cfg.train_w} is larger than every image in "
            f"{report.name} (the largest is {largest[1]}x{largest[0]}, WxH): at scale 1 each crop is the whole image "
            f"plus padding, and only random scales near TRAIN.scale_max {cfg.scale_max} fill it; choose a crop "
            f"(8k+1) no larger than the images")


def format_problems(problems: dict[str, list[str]], max_listed: int) -> list[str]:
    lines = []
    for kind, messages in sorted(problems.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {kind}: {len(messages)}")
        lines += [f"    {message}" for message in messages[:max_listed]]
        if len(messages) > max_listed:
            lines.append(f"    ... and {len(messages) - max_listed} more")
    return lines


def class_names(cfg: Config, problems: dict[str, list[str]]) -> list[str]:
    """Names from TEST.names_path (ids when unset); a bad names or colours file is a problem."""
    names = [str(i) for i in range(cfg.classes)]
    for key, read in (("names_path", read_names), ("colors_path", read_colors)):
        path = getattr(cfg, key)
        if not path:
            continue
        try:
            value = read(path, cfg.classes)
        except DataError as exc:
            problems.setdefault(NAMES_PROBLEM, []).append(str(exc))
            continue
        if key == "names_path":
            names = value
    return names


def selected_lists(cfg: Config, split: str) -> list[tuple[str, str]]:
    """(label, list path) of the splits to check; an explicitly asked-for split must be set."""
    wanted = {"train": [("train", "train_list")], "val": [("val", "val_list")],
              "both": [("train", "train_list"), ("val", "val_list")]}[split]
    chosen = [(name, getattr(cfg, key)) for name, key in wanted if getattr(cfg, key)]
    if not chosen:
        keys = " and ".join(f"DATA.{key}" for _, key in wanted)
        raise ConfigError(f"{keys} not set in the config: nothing to check")
    for name, key in wanted:
        if not getattr(cfg, key):
            print(f"note: DATA.{key} is not set; {name} not checked")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("train", "val", "both"), default="both",
                        help="which list(s) to check: DATA.train_list, DATA.val_list or both (default)")
    parser.add_argument("--max-listed", type=int, default=10,
                        help="files listed per problem type (default 10)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes reading samples (default: CPU count, at most 8)")
    add_config_arguments(parser)
    args = parse_config_args(parser, argv)
    if args.max_listed < 0 or args.workers < 1:
        parser.error("--max-listed must be >= 0 and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.opts)
    started = time.perf_counter()
    problems: dict[str, list[str]] = {}
    names = class_names(cfg, problems)
    reports, image_sets = [], {}
    for name, list_path in selected_lists(cfg, args.split):
        dataset = dataset_from_config(cfg, list_path, name)
        print(f"{name}: {list_path}, {len(dataset)} samples, data_root {cfg.data_root}", flush=True)
        report = check_list(name, dataset, args.workers)
        reports.append(report)
        image_sets[name] = {entry.image_path for entry in dataset.entries}
        for kind, messages in report.problems.items():
            problems.setdefault(kind, []).extend(messages)
    for report in reports:
        bad = sum(len(m) for m in report.problems.values())
        print(f"\n{report.name}: {report.samples} samples, {report.samples - bad} readable, "
              f"{format_sizes(report.sizes)}; label pixels per class:")
        print("\n".join(format_histogram(report, names, cfg.ignore_label)))
    for report in reports:
        warning = crop_warning(report, cfg)
        if warning:
            print(f"\nwarning: {warning}")
    if "train" in image_sets and "val" in image_sets and image_sets["train"] & image_sets["val"]:
        print(f"\nwarning: {len(image_sets['train'] & image_sets['val'])} val images are also in the "
              "training list: validation scores will be optimistic")
    total = sum(r.samples for r in reports)
    count = sum(len(m) for m in problems.values())
    elapsed = time.perf_counter() - started
    if count:
        print(f"\nFAILED: {count} problems ({len(problems)} types) in {total} samples, {elapsed:.1f}s:")
        print("\n".join(format_problems(problems, args.max_listed)))
        return 1
    print(f"\nOK: {total} samples checked, no problems, {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
