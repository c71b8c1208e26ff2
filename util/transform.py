"""Joint image/label transforms for training and validation, in the reference's order.

Every transform is called as `transform(image, label, rng)`: image float32 RGB HxWx3 in 0..255,
label uint8 HxW, rng a numpy Generator that random transforms draw from (deterministic ones
ignore it). All decoding-side work happens here, in the data workers; the last two steps turn
the pair into tensors ready to collate.
"""
from typing import Any, Sequence

import cv2
import numpy as np
import torch

VALUE_SCALE = 255
MEAN = tuple(m * VALUE_SCALE for m in (0.485, 0.456, 0.406))
STD = tuple(s * VALUE_SCALE for s in (0.229, 0.224, 0.225))


class Compose:
    """Applies transforms in order, handing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng: np.random.Generator):
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label


class RandScale:
    """Resize by one factor drawn uniformly from [scale_min, scale_max]."""

    def __init__(self, scale_min: float, scale_max: float):
        self.scale_min, self.scale_max = scale_min, scale_max

    def __call__(self, image, label, rng: np.random.Generator):
        scale = rng.uniform(self.scale_min, self.scale_max)
        height, width = label.shape
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


class RandRotate:
    """With probability p, rotate about the centre by an angle from [rotate_min, rotate_max];
    uncovered image pixels get `padding` (the mean), uncovered label pixels are ignored."""

    def __init__(self, rotate_min: float, rotate_max: float, padding: Sequence[float],
                 ignore_label: int, p: float = 0.5):
        self.rotate_min, self.rotate_max = rotate_min, rotate_max
        self.padding, self.ignore_label, self.p = list(padding), ignore_label, p

    def __call__(self, image, label, rng: np.random.Generator):
        if rng.random() >= self.p:
            return image, label
        angle = rng.uniform(self.rotate_min, self.rotate_max)
        height, width = label.shape
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=self.padding)
        label = cv2.warpAffine(label, matrix, (width, height), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label)
        return image, label


class RandomGaussianBlur:
    """With probability p, blur the image with a radius x radius Gaussian (sigma from size)."""

    def __init__(self, radius: int = 5, p: float = 0.5):
        self.radius, self.p = radius, p

    def __call__(self, image, label, rng: np.random.Generator):
        if rng.random() < self.p:
            image = cv2.GaussianBlur(image, (self.radius, self.radius), 0)
        return image, label


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, label, rng: np.random.Generator):
        if rng.random() < self.p:
            return cv2.flip(image, 1), cv2.flip(label, 1)
        return image, label


class Crop:
    """Crop to (crop_h, crop_w): at a random offset ('rand') or in the centre ('center'). A side
    shorter than the crop is padded first, evenly on both sides, image with `padding`, label with
    the ignore label."""

    def __init__(self, size: tuple[int, int], crop_type: str, padding: Sequence[float],
                 ignore_label: int):
        if crop_type not in ("rand", "center"):
            raise ValueError(f"crop_type must be 'rand' or 'center', got {crop_type!r}")
        self.crop_h, self.crop_w = size
        self.crop_type, self.padding, self.ignore_label = crop_type, list(padding), ignore_label

    def __call__(self, image, label, rng: np.random.Generator):
        height, width = label.shape
        pad_h, pad_w = max(self.crop_h - height, 0), max(self.crop_w - width, 0)
        if pad_h or pad_w:
            borders = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
            image = cv2.copyMakeBorder(image, *borders, cv2.BORDER_CONSTANT, value=self.padding)
            label = cv2.copyMakeBorder(label, *borders, cv2.BORDER_CONSTANT,
                                       value=self.ignore_label)
            height, width = label.shape
        if self.crop_type == "rand":
            top = int(rng.integers(0, height - self.crop_h + 1))
            left = int(rng.integers(0, width - self.crop_w + 1))
        else:
            top, left = (height - self.crop_h) // 2, (width - self.crop_w) // 2
        rows, cols = slice(top, top + self.crop_h), slice(left, left + self.crop_w)
        return image[rows, cols], label[rows, cols]


class Resize:
    """Resize to exactly (height, width): image linear, label nearest."""

    def __init__(self, size: tuple[int, int]):
        self.height, self.width = size

    def __call__(self, image, label, rng: np.random.Generator):
        size = (self.width, self.height)
        return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


class ToTensor:
    """HxWx3 float image -> 3xHxW float32 tensor; HxW label -> int64 tensor."""

    def __call__(self, image, label, rng: np.random.Generator):
        image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1),
                                                             dtype=np.float32))
        return image_tensor, torch.from_numpy(np.ascontiguousarray(label)).long()


class Normalize:
    """Per-channel (x - mean) / std on a 3xHxW tensor; mean and std in 0..255 scale."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image, label, rng: np.random.Generator):
        return (image - self.mean) / self.std, label


def build_train_transform(cfg: Any) -> Compose:
    """Scale -> rotate -> blur -> flip -> random crop -> tensor -> normalise."""
    return Compose([
        RandScale(cfg.scale_min, cfg.scale_max),
        RandRotate(cfg.rotate_min, cfg.rotate_max, padding=MEAN, ignore_label=cfg.ignore_label),
        RandomGaussianBlur(),
        RandomHorizontalFlip(),
        Crop((cfg.train_h, cfg.train_w), "rand", padding=MEAN, ignore_label=cfg.ignore_label),
        ToTensor(),
        Normalize(),
    ])


def build_val_transform(cfg: Any) -> Compose:
    """Centre crop (padded as in training) -> tensor -> normalise; uses no randomness."""
    return Compose([
        Crop((cfg.train_h, cfg.train_w), "center", padding=MEAN, ignore_label=cfg.ignore_label),
        ToTensor(),
        Normalize(),
    ])
