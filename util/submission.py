"""Predictions in the formats of the benchmark servers (TEST.submission_format), for test splits.

- ade20k: single-channel uint8 PNG of class id + 1 (the server's 1..150; 0 is "other"),
  named after the image (ADE_test_00000001.png).
- cityscapes: single-channel PNG of labelIds, mapped from our trainIds by the official table
  (util.label_maps.CITYSCAPES_TRAIN_IDS, inverted), named `<city>_<seq>_<frame>_leftImg8bit.png`:
  the official evaluator (cityscapesscripts evalPixelLevelSemanticLabeling) looks for
  `<city>_<seq>_<frame>*.png` anywhere under its results folder.
- voc: palette PNG (index = class id) with the VOC colour map, as VOC's own labels are stored.

Files go to save_folder/submission/, named after the image. Each format is tied to the class
count of its dataset, checked before any work starts.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from util.errors import ConfigError, DataError
from util.label_maps import (ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_IDS, VOC_CLASSES,
                             voc_palette)
from util.palette import write_png

CLASSES = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "voc": VOC_CLASSES}
CITYSCAPES_NAME = re.compile(r"^[^_/]+_\d+_\d+_")  # <city>_<seq>_<frame>_..., as the evaluator parses it

CITYSCAPES_LABEL_IDS = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; 0 (unlabeled) elsewhere
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_LABEL_IDS[_train_id] = _label_id


def check_submission_format(fmt: str, classes: int) -> None:
    """A format needs the class count of its dataset (19 trainIds, 150 or 21 classes)."""
    if fmt != "none" and classes != CLASSES[fmt]:
        raise ConfigError(f"TEST.submission_format {fmt} needs DATA.classes {CLASSES[fmt]}, "
                          f"but DATA.classes is {classes}")


def encode(pred: np.ndarray, fmt: str) -> np.ndarray:
    """Class ids (HxW uint8) -> the pixel values the server reads."""
    pred = np.asarray(pred, dtype=np.uint8)
    if fmt == "ade20k":
        return pred + np.uint8(1)
    if fmt == "cityscapes":
        return CITYSCAPES_LABEL_IDS[pred]
    return pred


def submission_name(image_path: str, out_name: str, fmt: str) -> str:
    """File name under submission/: the prediction's own name (the image's base name), checked
    against the pattern the Cityscapes evaluator matches."""
    if fmt == "cityscapes" and not CITYSCAPES_NAME.match(Path(image_path).name):
        raise DataError(f"TEST.submission_format cityscapes: image {image_path} is not named "
                        "<city>_<seq>_<frame>_leftImg8bit.png, so the evaluator cannot match it")
    return f"{out_name}.png"


def write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """An 8-bit palette PNG (written via a temporary file and rename, like util.palette.write_png)."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(indices, dtype=np.uint8))
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_submission(folder: Path, image_path: str, out_name: str, pred: np.ndarray, fmt: str) -> None:
    """Write one prediction in `fmt` under `folder` (nothing for `none`)."""
    if fmt == "none":
        return
    path = folder / submission_name(image_path, out_name, fmt)
    if fmt == "voc":
        write_palette_png(path, encode(pred, fmt), voc_palette())
    else:
        write_png(path, encode(pred, fmt))
