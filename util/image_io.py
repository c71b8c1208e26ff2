"""Reading images and label maps from disk, turning every failure into a DataError.

OpenCV signals most problems by returning None (or by printing a warning and returning a partly
decoded picture); these helpers check what came back so that a bad file is reported by name,
together with where it was listed (`source`, e.g. "dataset/toy/val.txt line 7").
"""
from pathlib import Path

import cv2
import numpy as np

from util.errors import DataError

# Failures are reported once, by name, as DataErrors; OpenCV's own warnings would add stray lines.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # what tool/demo.py takes as images
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_START_OF_SCAN = b"\xff\xda"
_JPEG_END_OF_IMAGE = b"\xff\xd9"


def _where(path: str, source: str | None) -> str:
    return f"{path} ({source})" if source else str(path)


def _read_bytes(path: str, kind: str, source: str | None) -> np.ndarray:
    """Whole file as a uint8 buffer; np.fromfile also copes with non-ASCII paths, unlike imread."""
    if not Path(path).is_file():
        raise DataError(f"{kind} {_where(path, source)}: file not found")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{kind} {_where(path, source)}: cannot be read ({exc.strerror})") from exc
    if data.size == 0:
        raise DataError(f"{kind} {_where(path, source)}: file is empty")
    return data


def _jpeg_is_truncated(data: np.ndarray) -> bool:
    """A complete JPEG has its end marker after the last scan (markers cannot occur inside scan
    data), so trailing bytes and embedded thumbnails do not fool the check. OpenCV 4.x decodes a
    truncated JPEG with a warning and grey rows instead of failing, hence this check."""
    raw = data.tobytes()
    if not raw.startswith(_JPEG_MAGIC):
        return False
    last_scan = raw.rfind(_JPEG_START_OF_SCAN)
    return raw.find(_JPEG_END_OF_IMAGE, max(last_scan, 0)) == -1


def _decode(data: np.ndarray, flags: int, kind: str, path: str, source: str | None) -> np.ndarray:
    try:
        decoded = cv2.imdecode(data, flags)
    except cv2.error as exc:
        raise DataError(f"{kind} {_where(path, source)}: cannot be decoded ({exc.err})") from exc
    if decoded is None or _jpeg_is_truncated(data):
        raise DataError(f"{kind} {_where(path, source)}: cannot be decoded; the file is corrupt, "
                        "truncated or not an image (expected JPEG or PNG)")
    return decoded


def read_image_rgb(path: str, source: str | None = None) -> np.ndarray:
    """Image as float32 RGB, HxWx3, values 0..255 (8-bit decoding as in the reference)."""
    return decode_image_rgb(_read_bytes(path, "image", source), path, source)


def decode_image_rgb(data: np.ndarray | bytes, name: str, source: str | None = None) -> np.ndarray:
    """The bytes of an image file (an upload to tool/serve.py) as read_image_rgb returns it; a
    DataError calls it `name`."""
    bgr = _decode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR, "image", name, source)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_label(path: str, source: str | None = None) -> np.ndarray:
    """Label map as uint8 HxW of raw class ids, read unchanged so nothing converts it silently."""
    data = _read_bytes(path, "label", source)
    label = _decode(data, cv2.IMREAD_UNCHANGED, "label", path, source)
    if label.ndim != 2:
        raise DataError(
            f"label {_where(path, source)}: has {label.shape[2]} channels; labels must be "
            "single-channel 8-bit PNGs with class ids, not colour images (a palette or RGB "
            "label must be converted to class ids first)")
    if label.dtype != np.uint8:
        raise DataError(f"label {_where(path, source)}: is {label.dtype.itemsize * 8}-bit; labels "
                        "must be single-channel 8-bit PNGs with class ids")
    return label
