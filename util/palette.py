"""Class names and colours (semseg's *_names.txt / *_colors.txt), colour PNGs and output file names."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from util.errors import DataError

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
# semseg keeps class files in data/<dataset>/; this project ships them in config/<dataset>/.
SEMSEG_CLASS_FILE = re.compile(r"(?:\./)?data/(?P<dataset>\w+)/(?P=dataset)_(?:names|colors)\.txt")


def class_file(path: str, what: str, root: Path = REPO_ROOT) -> str:
    """The names or colours file to read: `path`, or for semseg's data/<dataset>/<dataset>_names.txt
    (or _colors.txt) when that does not exist, the same file under config/<dataset>/ (logged)."""
    match = SEMSEG_CLASS_FILE.fullmatch(path)
    if Path(path).exists() or match is None:
        return path
    shipped = root / "config" / match.group("dataset") / Path(path).name
    if not shipped.is_file():
        return path
    logger.info("%s %s (where semseg keeps it) does not exist; using %s", what, path, shipped)
    return str(shipped)


def _read_lines(path: str, what: str) -> list[str]:
    path = class_file(path, what)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"{what} file {path} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_names(path: str, classes: int) -> list[str]:
    """One class name per line (TEST.names_path); the count must equal DATA.classes."""
    names = _read_lines(path, "TEST.names_path")
    if len(names) != classes:
        raise DataError(f"TEST.names_path {path} has {len(names)} names but DATA.classes is {classes}")
    return names


def read_colors(path: str, classes: int) -> np.ndarray:
    """(classes, 3) uint8 RGB from lines `R G B` (TEST.colors_path)."""
    rows = []
    for number, line in enumerate(_read_lines(path, "TEST.colors_path"), start=1):
        parts = line.replace(",", " ").split()
        if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise DataError(f"TEST.colors_path {path} line {number}: expected `R G B` with values 0..255, got {line!r}")
        rows.append([int(p) for p in parts])
    if len(rows) != classes:
        raise DataError(f"TEST.colors_path {path} has {len(rows)} colours but DATA.classes is {classes}")
    return np.array(rows, dtype=np.uint8)


def colorize(label: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Class ids -> RGB image; ids without a colour (ignore) are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(colors)] = colors
    return table[label]


def side_by_side(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None,
                 errors: np.ndarray | None = None) -> np.ndarray:
    """image | prediction | ground truth | error map (the last two if given), RGB uint8,
    separated by a white bar."""
    h = image.shape[0]
    bar = np.full((h, 4, 3), 255, dtype=np.uint8)
    parts = [np.clip(image, 0, 255).astype(np.uint8)]
    for panel in (prediction, truth, errors):
        if panel is not None:
            parts += [bar, panel]
    return np.concatenate(parts, axis=1)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit PNG (RGB arrays are converted to OpenCV's BGR) via a temporary file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"could not encode {path}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


def output_names(image_paths: list[str], data_root: str) -> list[str]:
    """Prediction names under save_folder: the image's base name, or, when two images share one,
    their path relative to data_root (so neither overwrites the other). Names never leave
    save_folder: a path outside data_root becomes its base name plus a short hash of the path."""
    stems = [Path(p).stem for p in image_paths]
    if len(set(stems)) == len(stems):
        return stems
    def digest(path: str) -> str:
        return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]

    names = []
    for path, stem in zip(image_paths, stems):
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(data_root))
        if rel.startswith(os.pardir) or os.path.isabs(rel):
            names.append(f"{stem}_{digest(path)}")
        else:
            names.append(str(Path(rel).with_suffix("")).replace(os.sep, "/"))
    counts = Counter(names)  # a/x.jpg and a/x.png still share a name: tell them apart by their path
    return [f"{n}_{digest(p)}" if counts[n] > 1 else n for n, p in zip(names, image_paths)]
