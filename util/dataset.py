"""Semantic-segmentation samples from semseg-style list files.

A list file names one sample a line, `image_path label_path` relative to data_root (image path
only for split 'test'). Files are opened lazily, one sample at a time, so that a 20k-line list
loads instantly; each problem is reported with the file and the list line it came from.

Augmentation randomness is derived from (seed, epoch, index) alone, so a sample is the same
whichever worker, process or order produces it.
"""
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from util.config import FIELDS
from util.errors import ConfigError, DataError
from util.image_io import read_image_rgb, read_label

MAX_LISTED_VALUES = 10
LIST_KEYS = ("train_list", "val_list", "test_list")  # the config keys that name list files


class ListEntry(NamedTuple):
    """One sample of a list file: paths joined with data_root, and its 1-based line number."""
    image_path: str
    label_path: str | None
    line: int
    list_path: str

    @property
    def source(self) -> str:
        return f"{self.list_path} line {self.line}"


def _escapes_root(relative: str) -> bool:
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return True
    return ".." in relative and os.path.normpath(relative).split(os.sep)[0] == ".."


def read_list_file(list_path: str, data_root: str, split: str,
                   allow_unsafe_paths: bool = False) -> list[ListEntry]:
    """Parse a list file; paths are checked for form only, not for existence (see
    check_files_exist)."""
    expected = 1 if split == "test" else 2
    if not Path(list_path).is_file():
        raise DataError(f"list file {list_path}: not found")
    try:
        raw_lines = Path(list_path).read_bytes().split(b"\n")
    except OSError as exc:
        raise DataError(f"list file {list_path}: cannot be read ({exc.strerror})") from exc
    list_name = str(list_path)
    root_prefix = os.path.join(data_root, "")  # as os.path.join(data_root, x), but cheaper
    entries = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"list file {list_path} line {number}: is not valid UTF-8 "
                            f"(byte {exc.start + 1} of the line)") from exc
        if number == 1:
            text = text.removeprefix("\ufeff")
        columns = text.split()
        if not columns:
            continue
        if len(columns) != expected:
            wanted = ("1 column (image path) for split 'test'" if expected == 1 else
                      f"2 columns (image path, label path) for split '{split}'")
            raise DataError(f"list file {list_path} line {number}: has {len(columns)} columns, "
                            f"expected {wanted}, separated by whitespace: {text.strip()!r}")
        if not allow_unsafe_paths:
            for column in columns:
                if _escapes_root(column):
                    raise DataError(
                        f"list file {list_path} line {number}: path {column!r} is absolute or "
                        f"leaves data_root {data_root!r}; list paths must be relative to "
                        "data_root (set DATA.allow_unsafe_paths True to allow it)")
        paths = [column if os.path.isabs(column) else root_prefix + column for column in columns]
        entries.append(ListEntry(paths[0], paths[1] if expected == 2 else None, number,
                                 list_name))
    if not entries:
        raise DataError(f"list file {list_path}: contains no samples")
    return entries


def check_files_exist(entries: list[ListEntry]) -> None:
    """Raise a DataError naming every missing file (at most MAX_LISTED_VALUES) with its line."""
    missing = [f"{path} ({entry.source})" for entry in entries
               for path in (entry.image_path, entry.label_path)
               if path is not None and not os.path.isfile(path)]
    if missing:
        extra = len(missing) - MAX_LISTED_VALUES
        more = f" and {extra} more" if extra > 0 else ""
        raise DataError(f"{len(missing)} listed files not found: "
                        f"{'; '.join(missing[:MAX_LISTED_VALUES])}{more}")


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def build_label_lut(classes: int, ignore_label: int, reduce_zero_label: bool = False,
                    label_map: Mapping[int, int] | None = None) -> np.ndarray | None:
    """256-entry uint8 table raw id -> train id, or None when labels are used as stored.

    reduce_zero_label (ADE20K raw 0..150): 0 -> ignore, x -> x - 1, raw 255 stays ignored.
    label_map (e.g. Cityscapes labelId -> trainId): ids missing from the map become ignore.
    """
    if not _is_plain_int(classes) or not 1 <= classes <= 256:
        raise ConfigError(f"DATA.classes must be an integer in 1..256, got {classes!r}")
    if not _is_plain_int(ignore_label) or not 0 <= ignore_label <= 255:
        raise ConfigError(f"TRAIN.ignore_label must be an integer in 0..255 (labels are 8-bit), "
                          f"got {ignore_label!r}")
    if reduce_zero_label and label_map:
        raise ConfigError("DATA.reduce_zero_label and DATA.label_map are both set; use one: "
                          "reduce_zero_label for ADE20K-style raw ids, label_map otherwise")
    if reduce_zero_label:
        lut = np.arange(-1, 255, dtype=np.int64)
        lut[0] = lut[255] = ignore_label
        return lut.astype(np.uint8)
    if not label_map:
        return None
    if not isinstance(label_map, Mapping):
        raise ConfigError(f"DATA.label_map must be a mapping raw id -> train id, "
                          f"got {type(label_map).__name__}")
    lut = np.full(256, ignore_label, dtype=np.uint8)
    for raw, train in label_map.items():
        if not _is_plain_int(raw) or not 0 <= raw <= 255:
            raise ConfigError(f"DATA.label_map: key {raw!r} must be a raw label id in 0..255")
        if not _is_plain_int(train) or not (0 <= train < classes or train == ignore_label):
            raise ConfigError(f"DATA.label_map: {raw} -> {train!r}; train ids must be in "
                              f"0..{classes - 1} (DATA.classes is {classes}) or the ignore "
                              f"label {ignore_label}")
        lut[raw] = train
    return lut


class SemSegDataset(Dataset):
    """Samples of one list file. dataset[i] or dataset[(epoch, i)] gives (image, label) after
    `transform(image, label, rng)`, or (image,) for split 'test'. Without a transform the numpy
    arrays are returned (float32 RGB HxWx3, uint8 HxW)."""

    def __init__(self, list_path: str, data_root: str, split: str, classes: int,
                 ignore_label: int, transform: Callable | None = None,
                 label_lut: np.ndarray | None = None, seed: int = 0,
                 allow_unsafe_paths: bool = False):
        self.entries = read_list_file(list_path, data_root, split, allow_unsafe_paths)
        self.split = split
        self.classes = classes
        self.ignore_label = ignore_label
        self.transform = transform
        self.label_lut = label_lut
        self.seed = seed
        valid = np.zeros(256, dtype=bool)
        valid[:classes] = True
        valid[ignore_label] = True
        # Validity of each raw value once remapped, so the check runs on the label as stored.
        self._raw_value_ok = valid if label_lut is None else valid[label_lut]

    def __len__(self) -> int:
        return len(self.entries)

    def _checked_label(self, entry: ListEntry) -> np.ndarray:
        label = read_label(entry.label_path, entry.source)
        counts = np.bincount(label.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self._raw_value_ok)
        if bad.size:
            shown = bad[:MAX_LISTED_VALUES].tolist()
            extra = bad.size - MAX_LISTED_VALUES
            more = f" (and {extra} more)" if extra > 0 else ""
            values = f"values {shown}{more}"
            if self.label_lut is not None:
                values = f"raw values {shown}{more} remapped to {self.label_lut[shown].tolist()}"
            raise DataError(
                f"label {entry.label_path} ({entry.source}): {values} are outside "
                f"0..{self.classes - 1} and not the ignore label {self.ignore_label} "
                f"(DATA.classes is {self.classes})")
        return label if self.label_lut is None else self.label_lut[label]

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        """(image float32 RGB HxWx3, label uint8 HxW remapped and checked or None, image path)."""
        entry = self.entries[index]
        image = read_image_rgb(entry.image_path, entry.source)
        if entry.label_path is None:
            return image, None, entry.image_path
        label = self._checked_label(entry)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{entry.source}: image {entry.image_path} is {image.shape[1]}x{image.shape[0]} "
                f"but label {entry.label_path} is {label.shape[1]}x{label.shape[0]} (WxH); "
                "they must have the same size")
        return image, label, entry.image_path

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"sample index {index} out of range 0..{len(self.entries) - 1}")
        image, label, _ = self.load_raw(index)
        if self.transform is None:
            return (image,) if label is None else (image, label)
        rng = np.random.default_rng([self.seed, epoch, index])
        if label is None:
            # An all-ignore placeholder lets the same transforms serve unlabelled samples.
            placeholder = np.full(image.shape[:2], self.ignore_label, dtype=np.uint8)
            return (self.transform(image, placeholder, rng)[0],)
        return self.transform(image, label, rng)


def dataset_from_config(cfg, list_path: str, split: str, transform: Callable | None = None,
                        seed: int = 0) -> SemSegDataset:
    """One list file read the way every tool reads it: DATA.data_root, classes, ignore_label, the
    label remapping (reduce_zero_label / label_map) and the path policy from the config. A missing
    list names the config key(s) that point at it and how the lists are made."""
    if not Path(list_path).is_file():
        keys = " and ".join(f"{FIELDS[key].section}.{key}" for key in LIST_KEYS if getattr(cfg, key) == list_path)
        raise DataError(f"list file {list_path}: not found ({keys or 'the list given'}); write the lists with "
                        f"tool/prepare_dataset.py (the toy data: tool/make_toy_dataset.py), see docs/datasets.md, "
                        f"or set the key to a list of your own")
    lut = build_label_lut(cfg.classes, cfg.ignore_label, cfg.reduce_zero_label, cfg.label_map)
    return SemSegDataset(list_path, cfg.data_root, split, cfg.classes, cfg.ignore_label, transform=transform,
                         label_lut=lut, seed=seed, allow_unsafe_paths=cfg.allow_unsafe_paths)
