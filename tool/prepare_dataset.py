"""Turn a dataset in its official download layout into the layout and list files the configs expect.

    python tool/prepare_dataset.py ade20k     --src /data/ADEChallengeData2016 --dst dataset/ade20k
    python tool/prepare_dataset.py cityscapes --src /data/cityscapes --dst dataset/cityscapes
    python tool/prepare_dataset.py voc2012    --src /data/VOCdevkit --sbd /data/benchmark_RELEASE --dst dataset/voc2012
    python tool/prepare_dataset.py folder     --images my/images --labels my/labels --dst dataset/custom

Image folders are linked into --dst (absolute symlinks; `--link relative` or `--link copy`);
labels that need it are converted to single-channel class-id PNGs (255 = ignore):
  ade20k      images/{training,validation} (links), annotations/... (raw 0 -> 255, x -> x - 1),
              list/training.txt, list/validation.txt
  cityscapes  leftImg8bit/{train,val,test} (links), gtFine/<split>/<city>/*_gtFine_labelTrainIds.png
              (official labelId -> trainId), list/fine_train.txt, fine_val.txt, fine_test.txt
  voc2012     JPEGImages (link), SegmentationClassAug/*.png (palette decoded, border 255; SBD .mat
              for images VOC does not label), list/train.txt, val.txt, train_aug.txt (needs SBD)
  folder      images, labels (links; labels used as they are), list/train.txt, list/val.txt
--src may name the folder that holds the download's top folder (ADEChallengeData2016,
VOCdevkit, benchmark_RELEASE) or that folder itself. Running again redoes nothing that is
already right: links to the same place, converted labels newer than their source, list files
with the same content.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import map_with_progress, run_main  # noqa: E402
from util.errors import DataError, UserError  # noqa: E402
from util.label_maps import LABEL_CONVERTERS  # noqa: E402
from util.palette import write_png  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MAX_LISTED = 10
# (train_list, val_list) under <dst>/list/ that the shipped configs name.
CONFIG_LISTS = {"ade20k": ("training.txt", "validation.txt"),
                "cityscapes": ("fine_train.txt", "fine_val.txt"),
                "voc2012": ("train_aug.txt", "val.txt"),
                "folder": ("train.txt", "val.txt")}


class Task(NamedTuple):
    """One output file made from one input file: a label conversion or a plain copy."""
    kind: str  # a key of LABEL_CONVERTERS, or "copy"
    src: str
    dst: str


@dataclass
class Plan:
    """Everything a subcommand will do, worked out from the source layout before writing."""
    links: list[tuple[Path, Path]] = field(default_factory=list)  # (source folder, its place in dst)
    tasks: list[Task] = field(default_factory=list)
    lists: dict[str, list[str]] = field(default_factory=dict)  # file name under dst/list -> lines
    notes: list[str] = field(default_factory=list)


def _up_to_date(task: Task) -> bool:
    """Done by an earlier run: outputs are written atomically, so existing and no older than the
    source means complete (copies keep the source's time and must match its size)."""
    try:
        out, source = os.stat(task.dst), os.stat(task.src)
    except FileNotFoundError:
        return False
    same_size = task.kind != "copy" or out.st_size == source.st_size
    return same_size and out.st_mtime_ns >= source.st_mtime_ns


def run_task(task: Task) -> tuple[bool, str | None]:
    """(whether a file was written, error message or None); errors are collected, not raised, so
    that one bad file does not stop the other thousands."""
    try:
        if _up_to_date(task):
            return False, None
        target = Path(task.dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if task.kind == "copy":
            partial = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.copy2(task.src, partial)
            os.replace(partial, target)
        else:
            write_png(target, LABEL_CONVERTERS[task.kind](task.src))
        return True, None
    except (UserError, OSError) as exc:
        return False, str(exc)


# ---- finding the official layout --------------------------------------------------------------

def _describe_folder(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "nothing (empty folder)"
    more = f" (+{len(entries) - MAX_LISTED} more)" if len(entries) > MAX_LISTED else ""
    return ", ".join(entries[:MAX_LISTED]) + more


def find_layout(src: Path, containers: list[str], markers: list[str], what: str) -> Path:
    """The folder under src (one of containers, or src itself) holding every marker path, or a
    UserError saying what was expected where and what is there instead."""
    if not src.is_dir():
        state = "is not a folder" if src.exists() else "does not exist"
        raise UserError(f"--src {src} {state}; expected the {what} download")
    candidates = [src / c for c in containers] + [src]
    for candidate in candidates:
        if all((candidate / m).exists() for m in markers):
            return candidate
    best = max(candidates, key=lambda c: sum((c / m).exists() for m in markers))  # ties: outermost
    expected = best / next(m for m in markers if not (best / m).exists())
    nearest = expected.parent
    while not nearest.is_dir():
        nearest = nearest.parent
    hint = (f" (--src may be the folder holding {containers[0]} or {containers[0]} itself)"
            if containers else "")
    raise UserError(f"not the official {what} layout: expected {expected.relative_to(src).as_posix()} "
                    f"under {src}{hint}; found in {nearest}: {_describe_folder(nearest)}")


def _require_none_missing(missing: list[str], what: str) -> None:
    if missing:
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise DataError(f"{len(missing)} {what}: {', '.join(missing[:MAX_LISTED])}{more}")


def _file_names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder) if entry.is_file()}


def _read_name_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: lists no images")
    return names


# ---- planners: one per subcommand ----------------------------------------------------------

def plan_ade20k(args: argparse.Namespace) -> Plan:
    root = find_layout(Path(args.src), ["ADEChallengeData2016"],
                       ["images/training", "images/validation", "annotations/training",
                        "annotations/validation"], "ADE20K")
    dst = Path(args.dst)
    if (dst / "annotations").resolve() == (root / "annotations").resolve():
        raise UserError(f"--dst {dst} is the raw ADE20K folder: converted annotations would "
                        "overwrite the raw ones; choose another --dst, e.g. dataset/ade20k")
    plan = Plan()
    for split, list_name in zip(("training", "validation"), CONFIG_LISTS["ade20k"]):
        image_dir, raw_dir = root / "images" / split, root / "annotations" / split
        plan.links.append((image_dir, dst / "images" / split))
        annotations = _file_names(raw_dir)
        images = sorted(n for n in _file_names(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise DataError(f"{image_dir}: no images found")
        missing, lines = [], []
        for image in images:
            label = Path(image).stem + ".png"
            if label not in annotations:
                missing.append(str(raw_dir / label))
                continue
            plan.tasks.append(Task("ade20k", str(raw_dir / label), str(dst / "annotations" / split / label)))
            lines.append(f"images/{split}/{image} annotations/{split}/{label}")
        _require_none_missing(missing, f"ADE20K {split} annotations are missing")
        plan.lists[list_name] = lines
    return plan


def plan_cityscapes(args: argparse.Namespace) -> Plan:
    root = find_layout(Path(args.src), [], ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train",
                                            "gtFine/val"], "Cityscapes")
    dst, plan = Path(args.dst), Plan()
    suffix = "_leftImg8bit.png"
    for split, list_name in zip(("train", "val"), CONFIG_LISTS["cityscapes"]):
        image_dir = root / "leftImg8bit" / split
        plan.links.append((image_dir, dst / "leftImg8bit" / split))
        images = sorted(image_dir.glob(f"*/*{suffix}"))
        if not images:
            raise DataError(f"{image_dir}: no <city>/*{suffix} images found")
        missing, lines = [], []
        for image in images:
            city, prefix = image.parent.name, image.name[:-len(suffix)]
            raw = root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png"
            if not raw.is_file():
                missing.append(str(raw))
                continue
            label = f"gtFine/{split}/{city}/{prefix}_gtFine_labelTrainIds.png"
            plan.tasks.append(Task("cityscapes", str(raw), str(dst / label)))
            lines.append(f"leftImg8bit/{split}/{city}/{image.name} {label}")
        _require_none_missing(missing, f"Cityscapes {split} labelIds files are missing")
        plan.lists[list_name] = lines
    test_dir = root / "leftImg8bit" / "test"
    if test_dir.is_dir():
        plan.links.append((test_dir, dst / "leftImg8bit" / "test"))
        plan.lists["fine_test.txt"] = [f"leftImg8bit/test/{p.parent.name}/{p.name}"
                                       for p in sorted(test_dir.glob(f"*/*{suffix}"))]
    return plan


def _find_sbd(args: argparse.Namespace) -> Path | None:
    markers, containers = ["cls", "train.txt", "val.txt"], ["benchmark_RELEASE/dataset", "dataset"]
    if args.sbd:
        return find_layout(Path(args.sbd), containers, markers, "SBD (benchmark_RELEASE)")
    for folder in (Path(args.src), Path(args.src).resolve().parent):  # inside --src, or beside VOCdevkit
        candidate = folder / "benchmark_RELEASE" / "dataset"
        if all((candidate / m).exists() for m in markers):
            return candidate
    return None


def plan_voc2012(args: argparse.Namespace) -> Plan:
    root = find_layout(Path(args.src), ["VOCdevkit/VOC2012", "VOC2012"],
                       ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
                        "ImageSets/Segmentation/val.txt"], "VOC2012")
    dst, plan = Path(args.dst), Plan()
    plan.links.append((root / "JPEGImages", dst / "JPEGImages"))
    train = _read_name_list(root / "ImageSets/Segmentation/train.txt")
    val = _read_name_list(root / "ImageSets/Segmentation/val.txt")
    voc_labels = _file_names(root / "SegmentationClass")
    missing = [f"{root / 'SegmentationClass' / name}.png" for name in train + val
               if f"{name}.png" not in voc_labels]
    _require_none_missing(missing, "VOC labels listed in ImageSets/Segmentation are missing")
    sources = {name: Task("voc", f"{root / 'SegmentationClass' / name}.png",
                          f"{dst / 'SegmentationClassAug' / name}.png") for name in train + val}
    names = {"train.txt": train, "val.txt": val}
    sbd = _find_sbd(args)
    if sbd is None:
        plan.notes.append("no SBD found (--sbd, or benchmark_RELEASE beside VOCdevkit): "
                          "list/train_aug.txt, which the voc2012 configs train on, was not written; "
                          "pass --sbd or train with DATA.train_list dataset/voc2012/list/train.txt")
    else:
        held_out = set(val)
        augmented = sorted((set(_read_name_list(sbd / "train.txt")) | set(_read_name_list(sbd / "val.txt"))
                            | set(train)) - held_out)
        mats = _file_names(sbd / "cls")
        missing = [f"{sbd / 'cls' / name}.mat" for name in augmented
                   if name not in sources and f"{name}.mat" not in mats]
        _require_none_missing(missing, "SBD annotations are missing")
        for name in augmented:  # VOC's own labels (with the border) win where both exist
            sources.setdefault(name, Task("sbd", f"{sbd / 'cls' / name}.mat",
                                          f"{dst / 'SegmentationClassAug' / name}.png"))
        names["train_aug.txt"] = augmented
    images = _file_names(root / "JPEGImages")
    missing = sorted({f"{root / 'JPEGImages' / name}.jpg" for listed in names.values() for name in listed
                      if f"{name}.jpg" not in images})
    _require_none_missing(missing, "VOC images are missing")
    plan.tasks = [sources[name] for name in sorted(sources)]
    plan.lists = {list_name: [f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png" for n in listed]
                  for list_name, listed in names.items()}
    return plan


def _split_for_validation(count: int, fraction: float, seed: int) -> set[int]:
    if fraction == 0:
        return set()
    size = max(1, round(count * fraction))
    if size >= count:
        raise UserError(f"--val-fraction {fraction} leaves no training samples out of {count}")
    return set(np.random.default_rng(seed).permutation(count)[:size].tolist())


def plan_folder(args: argparse.Namespace) -> Plan:
    images, labels = Path(args.images), Path(args.labels)
    for flag, folder in (("--images", images), ("--labels", labels)):
        if not folder.is_dir():
            raise UserError(f"{flag} {folder} is not a folder")
    label_by_key = {p.relative_to(labels).with_suffix("").as_posix(): p.relative_to(labels).as_posix()
                    for p in labels.rglob("*.png")}
    pairs, missing, seen = [], [], {}
    for image in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        key = image.relative_to(images).with_suffix("").as_posix()
        if key in seen:
            raise UserError(f"{image} and {seen[key]} would share the label {key}.png; keep one image per name")
        seen[key] = image
        if key not in label_by_key:
            missing.append(f"{labels / key}.png")
            continue
        pairs.append(f"images/{image.relative_to(images).as_posix()} labels/{label_by_key[key]}")
    _require_none_missing(missing, f"images under {images} have no label PNG of the same name under {labels}")
    if not pairs:
        raise UserError(f"--images {images}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    dst, plan = Path(args.dst), Plan()
    plan.links += [(images, dst / "images"), (labels, dst / "labels")]
    held_out = _split_for_validation(len(pairs), args.val_fraction, args.seed)
    train_list, val_list = CONFIG_LISTS["folder"]
    plan.lists[train_list] = [line for i, line in enumerate(pairs) if i not in held_out]
    if held_out:
        plan.lists[val_list] = [line for i, line in enumerate(pairs) if i in held_out]
    plan.notes.append("labels are listed as they are: check them with "
                      "python tool/check_dataset.py --config=<your yaml>")
    return plan


PLANNERS: dict[str, Callable[[argparse.Namespace], Plan]] = {
    "ade20k": plan_ade20k, "cityscapes": plan_cityscapes, "voc2012": plan_voc2012, "folder": plan_folder}


# ---- carrying out a plan ------------------------------------------------------------------

def place_folder(source: Path, target: Path, mode: str) -> tuple[str, list[Task]]:
    """Make `target` show `source`: ('kept' | 'linked' | 'copied', copy tasks). A target that
    already resolves to source is kept whatever the mode; anything else there is refused."""
    source_abs = source.resolve()
    if target.exists() or target.is_symlink():
        if target.resolve() == source_abs:
            return "kept", []
        if target.is_symlink() or mode != "copy":
            what = f"a link to {os.readlink(target)}" if target.is_symlink() else "a folder"
            raise UserError(f"{target} is already {what}, not a link to {source}; remove it or "
                            "choose another --dst")
    if mode == "copy":
        return "copied", [Task("copy", str(p), str(target / p.relative_to(source)))
                          for p in sorted(source.rglob("*")) if p.is_file()]
    target.parent.mkdir(parents=True, exist_ok=True)
    link = source_abs if mode == "absolute" else Path(os.path.relpath(source_abs, target.parent.resolve()))
    target.symlink_to(link, target_is_directory=True)
    return "linked", []


def run_tasks(tasks: list[Task], workers: int) -> tuple[int, list[str]]:
    """Run every task (in `workers` processes when > 1) with a progress line every few seconds;
    (files written, error messages)."""
    if not tasks:
        return 0, []
    written, errors = 0, []
    for wrote, error in map_with_progress(run_task, tasks, workers, "files", ordered=False):
        written += wrote
        if error:
            errors.append(error)
    return written, errors


def write_list(path: Path, lines: list[str]) -> bool:
    """Write a list file unless it already holds exactly these lines; True when written."""
    text = "".join(f"{line}\n" for line in lines)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return True


def execute(plan: Plan, dst: Path, link_mode: str, workers: int) -> list[str]:
    """Carry out the plan under dst; the report lines. Raises DataError after the run when some
    files could not be converted (the others are done and are skipped next time)."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} exists and is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    placed: dict[str, int] = {}
    tasks = list(plan.tasks)
    for source, target in plan.links:
        outcome, copies = place_folder(source, target, link_mode)
        placed[outcome] = placed.get(outcome, 0) + 1
        tasks += copies
    written, errors = run_tasks(tasks, workers)
    report = ["folders: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(placed.items())),
              f"files: {written} written, {len(tasks) - written - len(errors)} already up to date"]
    for name, lines in plan.lists.items():
        state = "written" if write_list(dst / "list" / name, lines) else "unchanged"
        report.append(f"list/{name}: {len(lines)} samples ({state})")
    report += [f"note: {note}" for note in plan.notes]
    if errors:
        print("\n".join(report))
        _require_none_missing(errors, "files could not be converted (fix them and run again)")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--link", choices=("absolute", "relative", "copy"), default="absolute",
                        help="how image folders appear under --dst: absolute symlinks (default), "
                             "relative symlinks (dst and src move together) or copies")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes converting labels (default: CPU count, at most 8)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="DATASET")
    for name, help_text in (("ade20k", "ADEChallengeData2016 (SceneParsing, 150 classes)"),
                            ("cityscapes", "Cityscapes fine annotations (19 classes)"),
                            ("voc2012", "PASCAL VOC 2012 with SBD train_aug (21 classes)")):
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.add_argument("--src", required=True, help="the raw download (see the top of --help)")
        sub.add_argument("--dst", default=f"dataset/{name}", help=f"output folder (default dataset/{name})")
        if name == "voc2012":
            sub.add_argument("--sbd", help="SBD benchmark_RELEASE (or its parent, or its dataset/); "
                                           "default: benchmark_RELEASE inside --src when present")
    folder = commands.add_parser("folder", parents=[common], help="your own images + class-id label PNGs",
                                 description="list image/label pairs matched by relative path and name "
                                             "(images/a/x.jpg <-> labels/a/x.png)")
    folder.add_argument("--images", required=True, help="folder of images (searched recursively)")
    folder.add_argument("--labels", required=True, help="folder of single-channel class-id PNGs")
    folder.add_argument("--dst", required=True, help="output folder, e.g. dataset/custom")
    folder.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of pairs held out for list/val.txt (default 0.2; 0 = none)")
    folder.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default 0)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.command == "folder" and not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    plan = PLANNERS[args.command](args)
    print(f"{args.command}: {len(plan.tasks)} labels to convert, {len(plan.links)} folders to link, "
          f"{len(plan.lists)} list files -> {args.dst}", flush=True)
    report = execute(plan, Path(args.dst), args.link, args.workers)
    print("\n".join(report))
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
