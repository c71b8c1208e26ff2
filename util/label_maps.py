"""Label encodings of the public datasets and their conversion to train ids.

Cityscapes stores `labelIds` 0..33 (the official *_labelIds.png never hold -1 or 255: a licence
plate's pixels keep the id of what is underneath, usually car) of which 19 are trained:
CITYSCAPES_TRAIN_IDS is the official labelId -> trainId table, everything unlisted is ignored. VOC2012 stores labels as
palette PNGs; OpenCV expands the palette to colours, so decode_voc_colors maps each colour back
to its index through the standard VOC colour map (index 255, the object border, is ignored).
ADE20K's raw 0..150 needs 0 -> ignore and x -> x - 1, which util.dataset.build_label_lut does
(reduce_zero_label); nothing here repeats it. LABEL_CONVERTERS turns one raw annotation file of
each dataset into the uint8 HxW train-id map that tool/prepare_dataset.py writes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from util.dataset import build_label_lut
from util.errors import DataError
from util.image_io import read_image_rgb, read_label

# Official cityscapesScripts table: labelId -> trainId for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_CLASSES = 19
ADE20K_CLASSES = 150
VOC_CLASSES = 21
IGNORE_LABEL = 255
VOC_BORDER_INDEX = 255  # palette index of the 5-pixel object outline, colour (224, 224, 192)
MAX_LISTED_COLORS = 5


def voc_palette(size: int = 256) -> np.ndarray:
    """(size, 3) uint8 RGB: the VOC colour map, which spreads the bits of an index over R, G, B
    from the most significant bit down (bits 0, 1, 2 of each triplet go to R, G, B)."""
    index = np.arange(size)
    palette = np.zeros((size, 3), dtype=np.int64)
    for shift in range(8):
        triplet = index >> (3 * shift)
        for channel in range(3):
            palette[:, channel] |= ((triplet >> channel) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_voc_colors(rgb: np.ndarray, where: str) -> np.ndarray:
    """HxWx3 uint8 RGB (a VOC palette PNG as OpenCV reads it) -> HxW uint8 palette indices.

    Colours not in the VOC palette raise a DataError naming `where` and the first few colours.
    The VOC colour map is a bijection on 0..255, so every palette colour has one index.
    """
    keys = _pack(voc_palette())
    order = np.argsort(keys)
    sorted_keys = keys[order]
    packed = _pack(rgb)
    position = np.clip(np.searchsorted(sorted_keys, packed), 0, len(sorted_keys) - 1)
    known = sorted_keys[position] == packed
    if not known.all():
        unknown = np.unique(packed[~known])
        shown = [((int(k) >> 16) & 255, (int(k) >> 8) & 255, int(k) & 255)
                 for k in unknown[:MAX_LISTED_COLORS]]
        more = f" and {unknown.size - MAX_LISTED_COLORS} more" if unknown.size > MAX_LISTED_COLORS else ""
        raise DataError(f"{where}: colours {shown}{more} (RGB) are not in the VOC palette; expected "
                        "a VOC SegmentationClass palette PNG")
    return order[position].astype(np.uint8)


def check_label_values(label: np.ndarray, classes: int, ignore_label: int, where: str) -> None:
    """Raise a DataError naming `where` when a converted label holds ids outside
    0..classes-1 that are not the ignore label."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if v >= classes and v != ignore_label]
    if bad:
        raise DataError(f"{where}: values {bad[:10]} are outside 0..{classes - 1} and not the "
                        f"ignore label {ignore_label}")


# ---- raw annotation file -> uint8 HxW train ids (run in prepare_dataset's worker processes) -----

ADE20K_LUT = build_label_lut(ADE20K_CLASSES, IGNORE_LABEL, reduce_zero_label=True)
CITYSCAPES_LUT = build_label_lut(CITYSCAPES_CLASSES, IGNORE_LABEL, label_map=CITYSCAPES_TRAIN_IDS)


def ade20k_label(src: str) -> np.ndarray:
    raw = read_label(src)
    check_label_values(raw, ADE20K_CLASSES + 1, IGNORE_LABEL, f"ADE20K annotation {src}")
    return ADE20K_LUT[raw]


def cityscapes_label(src: str) -> np.ndarray:
    return CITYSCAPES_LUT[read_label(src)]


def voc_label(src: str) -> np.ndarray:
    where = f"VOC label {src}"
    label = decode_voc_colors(read_image_rgb(src).astype(np.uint8), where)
    check_label_values(label, VOC_CLASSES, IGNORE_LABEL, where)
    return label


def sbd_label(src: str) -> np.ndarray:
    from scipy.io import loadmat  # only VOC needs scipy
    where = f"SBD annotation {src}"
    try:
        segmentation = loadmat(src, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise DataError(f"{where}: cannot read GTcls.Segmentation from the .mat file ({exc})") from exc
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2 or segmentation.size == 0 or not np.issubdtype(segmentation.dtype, np.integer) \
            or segmentation.min() < 0 or segmentation.max() > 255:
        raise DataError(f"{where}: GTcls.Segmentation is {segmentation.dtype} {segmentation.shape}; "
                        "expected a 2-D map of class ids 0..20")
    label = segmentation.astype(np.uint8)
    check_label_values(label, VOC_CLASSES, IGNORE_LABEL, where)
    return label


LABEL_CONVERTERS: dict[str, Callable[[str], np.ndarray]] = {
    "ade20k": ade20k_label, "cityscapes": cityscapes_label, "voc": voc_label, "sbd": sbd_label}
