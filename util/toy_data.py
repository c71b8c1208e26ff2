"""A small synthetic street-scene dataset laid out exactly like a real semseg dataset.

Six classes whose cues need texture, shape and context rather than colour alone:
sky (vertical gradient, soft clouds), grass (vertical fine-grained noise), water (the grass
colour of the same image, but smooth horizontal ripples), road (grey trapezoid to the horizon
with dashed markings), building (box on the horizon with a window grid) and ball (shaded disc).
Buildings and balls draw their colours from the same distribution, so only shape separates
them. A 2-pixel ignore band (255) surrounds every object, void blobs are ignored too, and thin
distractor lines, noise and brightness jitter add clutter.

Each sample is drawn from its own generator seeded with (seed, split, index): the bytes written
depend only on those, not on how many samples are made or in which order.
"""
import json
from pathlib import Path

import cv2
import numpy as np

from util.errors import UserError

CLASS_NAMES = ("sky", "grass", "water", "road", "building", "ball")
CLASS_COLORS = ((70, 130, 180), (107, 142, 35), (0, 80, 160), (128, 64, 128), (70, 70, 70),
                (220, 20, 60))
SKY, GRASS, WATER, ROAD, BUILDING, BALL = range(len(CLASS_NAMES))
IGNORE_LABEL = 255
SIZE_RANGE = (100, 200)
JPEG_QUALITY = 90
MANIFEST_NAME = "toy_manifest.json"
GENERATOR_VERSION = 3  # bump when the drawing changes: old manifests then stop matching
SPLIT_CODES = {"train": 0, "val": 1}


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    """Any hue, moderate saturation and brightness: shared by buildings and balls."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(70, 230), rng.uniform(100, 230)]]],
                   dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _paint_sky(image, horizon, rng):
    top = np.array([rng.uniform(30, 110), rng.uniform(80, 150), rng.uniform(170, 250)])
    bottom = np.minimum(top + rng.uniform(40, 90), 255)
    ramp = np.linspace(0.0, 1.0, horizon)[:, None, None]
    image[:horizon] = top * (1 - ramp) + bottom * ramp
    width = image.shape[1]
    for _ in range(rng.integers(0, 4)):
        mask = np.zeros(image.shape[:2], np.float32)
        centre = (int(rng.integers(0, width)), int(rng.integers(0, max(horizon, 1))))
        axes = (int(rng.integers(8, 30)), int(rng.integers(3, 10)))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), 3)[:horizon, :, None] * rng.uniform(0.5, 0.9)
        image[:horizon] = image[:horizon] * (1 - mask) + 245 * mask


def _paint_ground(image, label, horizon, rng):
    """Grass everywhere below the horizon, maybe a pond in the same colour, smooth-rippled."""
    height, width = label.shape
    base = np.array([rng.uniform(40, 100), rng.uniform(100, 170), rng.uniform(30, 90)])
    rows = height - horizon
    streaks = cv2.blur(rng.normal(0, 26, (rows, width)).astype(np.float32), (1, 3))
    image[horizon:] = base + streaks[:, :, None] * np.array([0.8, 1.0, 0.7])
    label[horizon:] = GRASS
    if rng.random() < 0.85:
        mask = np.zeros(label.shape, np.uint8)
        centre = (int(rng.uniform(0.2, 0.8) * width), int(horizon + rng.uniform(0.3, 0.7) * rows))
        axes = (int(rng.uniform(0.2, 0.45) * width), int(rng.uniform(0.2, 0.4) * rows) + 2)
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
        mask[:horizon + 2] = 0
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        # Ripples wide and strong enough that a network trained from scratch for 12 epochs tells
        # them from the grass streaks on any CPU (6-10 px at 18 was a tipping point: water 0.16-0.79).
        period, phase = rng.uniform(14, 24), rng.uniform(0, 2 * np.pi)
        ripples = 26 * np.sin(2 * np.pi * y / period + phase + 0.6 * np.sin(x / 9))
        water = base + ripples[:, :, None] + rng.normal(0, 2, (height, width, 1))
        inside = mask.astype(bool)
        image[inside] = water[inside]
        label[inside] = WATER


def _paint_road(image, label, horizon, rng):
    height, width = label.shape
    bottom_half = rng.uniform(0.2, 0.4) * width
    top_half = rng.uniform(0.02, 0.07) * width
    bottom_x, top_x = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * width
    polygon = np.array([[bottom_x - bottom_half, height], [bottom_x + bottom_half, height],
                        [top_x + top_half, horizon], [top_x - top_half, horizon]], np.int32)
    mask = np.zeros(label.shape, np.uint8)
    cv2.fillPoly(mask, [polygon], 1)
    inside = mask.astype(bool)
    grey = rng.uniform(85, 140) + rng.uniform(-8, 8, 3)
    image[inside] = grey + rng.normal(0, 5, (int(inside.sum()), 1))
    marking = np.array([240, 240, 240] if rng.random() < 0.6 else [230, 200, 40], np.float64)
    dash_steps = np.linspace(0.08, 1.0, 9)
    for start, end in zip(dash_steps[:-1:2], dash_steps[1::2]):
        points = [(int(top_x + (bottom_x - top_x) * t), int(horizon + (height - horizon) * t))
                  for t in (start, end)]
        cv2.line(image, points[0], points[1], marking.tolist(), max(1, int(4 * end)))
    label[inside] = ROAD


def _paint_building(image, label, instances, instance_id, horizon, rng):
    height, width = label.shape
    box_w = int(rng.uniform(0.12, 0.35) * width)
    box_h = int(rng.uniform(0.5, 1.0) * horizon) + 10
    left = int(rng.integers(0, width - box_w))
    bottom = min(horizon + int(rng.integers(0, 6)), height)
    top = max(bottom - box_h, 0)
    colour = _object_colour(rng)
    image[top:bottom, left:left + box_w] = colour
    cell = int(rng.integers(6, 11))
    window = cell // 2 + 1
    window_colour = colour * 0.35 if rng.random() < 0.6 else np.array([235, 225, 150])
    for y in range(top + 3, bottom - window, cell):
        for x in range(left + 3, left + box_w - window - 1, cell):
            image[y:y + window, x:x + window] = window_colour
    label[top:bottom, left:left + box_w] = BUILDING
    instances[top:bottom, left:left + box_w] = instance_id


def _paint_ball(image, label, instances, instance_id, rng):
    height, width = label.shape
    radius = rng.uniform(7, 0.22 * min(height, width))
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
    light = np.hypot(y - (cy - radius / 3), x - (cx - radius / 3)) / (1.3 * radius)
    shade = np.clip(1.2 - 0.6 * light, 0.4, 1.2)
    image[inside] = _object_colour(rng) * shade[inside][:, None]
    label[inside] = BALL
    instances[inside] = instance_id


def _add_clutter(image, label, rng):
    height, width = label.shape
    for _ in range(rng.integers(0, 4)):
        start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, start, end, rng.uniform(0, 255, 3).tolist(), 1)
    if rng.random() < 0.3:
        centre = rng.uniform([0, 0], [width, height])
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
        radii = rng.uniform(6, 18, angles.size)
        polygon = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        mask = np.zeros(label.shape, np.uint8)
        cv2.fillPoly(mask, [polygon.astype(np.int32)], 1)
        inside = mask.astype(bool)
        image[inside] = rng.uniform(0, 255, (int(inside.sum()), 3))
        label[inside] = IGNORE_LABEL


def render_toy_sample(rng: np.random.Generator, height: int, width: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 RGB HxWx3, label uint8 HxW with ids 0..5 and 255)."""
    image = np.zeros((height, width, 3), np.float32)
    label = np.full((height, width), SKY, np.uint8)
    instances = np.zeros((height, width), np.uint8)
    horizon = int(rng.uniform(0.3, 0.55) * height)
    _paint_sky(image, horizon, rng)
    _paint_ground(image, label, horizon, rng)
    if rng.random() < 0.8:
        _paint_road(image, label, horizon, rng)
    objects = [BUILDING] * int(rng.integers(0, 4)) + [BALL] * int(rng.integers(1, 4))
    for instance_id, kind in enumerate(objects, start=1):
        if kind == BUILDING:
            _paint_building(image, label, instances, instance_id, horizon, rng)
        else:
            _paint_ball(image, label, instances, instance_id, rng)
    # Object outlines are ignored, as in VOC: 1 pixel either side of each visible edge.
    kernel = np.ones((3, 3), np.uint8)
    label[cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)] = IGNORE_LABEL
    _add_clutter(image, label, rng)
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    image += rng.normal(0, 3, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _encode(extension: str, array: np.ndarray, params: list[int]) -> bytes:
    ok, buffer = cv2.imencode(extension, array, params)
    assert ok, f"OpenCV failed to encode a {extension} image"
    return buffer.tobytes()


def _sample_names(split: str, count: int) -> list[tuple[str, str]]:
    return [(f"images/{split}/toy_{split}_{i:05d}.jpg", f"labels/{split}/toy_{split}_{i:05d}.png")
            for i in range(count)]


def _manifest(seed: int, n_train: int, n_val: int, size_range: tuple[int, int]) -> dict:
    return {"generator": "util.toy_data", "version": GENERATOR_VERSION, "seed": seed,
            "n_train": n_train, "n_val": n_val, "size_range": list(size_range),
            "classes": len(CLASS_NAMES)}


def _is_complete(dst: Path, manifest: dict) -> bool:
    names = _sample_names("train", manifest["n_train"]) + _sample_names("val", manifest["n_val"])
    listed = ["train.txt", "val.txt", "test.txt", "toy_names.txt", "toy_colors.txt"]
    return all((dst / name).is_file() for pair in names for name in pair) and \
        all((dst / name).is_file() for name in listed)


def generate_toy_dataset(dst: str | Path, seed: int = 0, n_train: int = 240, n_val: int = 60,
                         size_range: tuple[int, int] = SIZE_RANGE, force: bool = False) -> bool:
    """Write the toy dataset under dst; return False (writing nothing) when dst already holds a
    complete one made with the same settings. A different toy dataset in dst is replaced only
    with force. Files of our own naming (toy_*) are the only ones ever removed."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"toy dataset destination {dst} exists and is not a directory")
    wanted = _manifest(seed, n_train, n_val, tuple(size_range))
    manifest_path = dst / MANIFEST_NAME
    if manifest_path.is_file() and not force:
        existing = json.loads(manifest_path.read_text())
        if existing == wanted and _is_complete(dst, wanted):
            return False
        if existing != wanted:
            raise UserError(
                f"{dst} already holds a toy dataset made with other settings ({existing}); "
                "pass -f to replace it")
    manifest_path.unlink(missing_ok=True)
    lines = {}
    for split, count in (("train", n_train), ("val", n_val)):
        for folder in (dst / "images" / split, dst / "labels" / split):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f"toy_{split}_*"):
                stale.unlink()
        for index, (image_name, label_name) in enumerate(_sample_names(split, count)):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
            height, width = (int(side) for side in rng.integers(size_range[0],
                                                                 size_range[1] + 1, 2))
            image, label = render_toy_sample(rng, height, width)
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            (dst / image_name).write_bytes(
                _encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]))
            (dst / label_name).write_bytes(_encode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, 9]))
        lines[split] = _sample_names(split, count)
    (dst / "train.txt").write_text("".join(f"{i} {l}\n" for i, l in lines["train"]))
    (dst / "val.txt").write_text("".join(f"{i} {l}\n" for i, l in lines["val"]))
    (dst / "test.txt").write_text("".join(f"{i}\n" for i, _ in lines["val"]))
    (dst / "toy_names.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    (dst / "toy_colors.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in CLASS_COLORS))
    manifest_path.write_text(json.dumps(wanted, indent=2) + "\n")
    return True
