"""Multi-scale sliding-window inference with flip, as semseg's test.py, batched on the device.

For each scale: resize the image so its long side is round(scale * base_size), pad it to at least
one window with the mean (split evenly), slide a test_h x test_w window with stride
ceil(window * stride_rate) (the last window aligned to the far edge), average each window's softmax
with that of its horizontal flip, average overlapping windows, crop the padding off, resize the
class-probability map (bilinear) to the original size; then average the scales and take the argmax.

Unlike the reference, the windows of an image (and their flips) go through the network in batches
of `batch_size` (optionally in bf16 / fp16: TEST.test_amp); normalisation, softmax, accumulation
and resizing run on the device (float32 by default), so the caller's argmax runs there too; and
the overlap count comes from per-row and per-column counts instead of being added up window by
window.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from util.precision import autocast
from util.transform import MEAN, STD


def window_batch_size(requested: int, device: torch.device | str) -> int:
    """TEST.test_batch_size, 0 = auto. A GPU wants many windows per forward; on a CPU big batches of
    large windows only add memory traffic (PSPNet-50 at 473 on 2 cores: network 19.9 s at 8, 16.8 s at 2)."""
    if requested > 0:
        return requested
    return 8 if torch.device(device).type == "cuda" else 2


def scaled_size(h: int, w: int, long_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the long side equal to long_size, keeping the aspect ratio (semseg's rounding);
    at least one pixel, so that a strip of an image still has a side to resize to."""
    if h > w:
        return long_size, max(1, round(long_size / float(h) * w))
    return max(1, round(long_size / float(w) * h)), long_size


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side of `size` >= crop; the last window ends at the far edge."""
    count = int(math.ceil(float(size - crop) / stride) + 1)
    return [min(i * stride + crop, size) - crop for i in range(count)]


def window_offsets(h: int, w: int, crop_h: int, crop_w: int, stride_rate: float) -> tuple[list[int], list[int]]:
    """Row and column offsets of the sliding windows over an (already padded) h x w image."""
    stride_h, stride_w = int(math.ceil(crop_h * stride_rate)), int(math.ceil(crop_w * stride_rate))
    return window_starts(h, crop_h, stride_h), window_starts(w, crop_w, stride_w)


def window_grid(h: int, w: int, crop_h: int, crop_w: int, stride_rate: float) -> list[tuple[int, int]]:
    """Top-left corners of the sliding windows over an (already padded) h x w image."""
    rows, columns = window_offsets(h, w, crop_h, crop_w, stride_rate)
    return [(y, x) for y in rows for x in columns]


def resize_image(image: np.ndarray, long_size: int) -> np.ndarray:
    """The reference's per-scale image resize (cv2, linear), done on the host or in a data worker."""
    h, w = image.shape[:2]
    new_h, new_w = scaled_size(h, w, long_size)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def to_network_input(image: np.ndarray | torch.Tensor, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 RGB HxWx3 (0..255; numpy, or a tensor a DataLoader may have pinned) -> normalised
    3xHxW on the device. The copy goes first, so the arithmetic runs on the device."""
    tensor = torch.as_tensor(image).to(device=device, non_blocking=True).permute(2, 0, 1).to(dtype)
    mean = torch.tensor(MEAN, device=tensor.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(STD, device=tensor.device, dtype=dtype).view(3, 1, 1)
    return ((tensor - mean) / std).contiguous()


def window_coverage(size: int, crop: int, starts: list[int]) -> torch.Tensor:
    """How many of the windows starting at `starts` cover each position along one side (float32)."""
    coverage = torch.zeros(size)
    for start in starts:
        coverage[start:start + crop] += 1
    return coverage


def pad_to_window(image: torch.Tensor, crop_h: int, crop_w: int) -> tuple[torch.Tensor, int, int]:
    """(padded image, top, left): a normalised 3xHxW image padded to at least one window, split evenly.
    Padding with zeros in normalised space equals the reference's padding with the mean."""
    _, h, w = image.shape
    pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(image, (left, pad_w - left, top, pad_h - top)) if pad_h or pad_w else image
    return padded, top, left


def image_windows(image: torch.Tensor, crop_h: int, crop_w: int, stride_rate: float = 2 / 3) -> torch.Tensor:
    """(windows, 3, crop_h, crop_w): the windows sliding_window_predict feeds the network for one
    normalised 3xHxW image, unflipped (int8 calibration sees exactly what inference will)."""
    padded, _, _ = pad_to_window(image, crop_h, crop_w)
    grid = window_grid(*padded.shape[1:], crop_h, crop_w, stride_rate)
    return torch.stack([padded[:, y:y + crop_h, x:x + crop_w] for y, x in grid])


@torch.inference_mode()
def sliding_window_predict(model: torch.nn.Module, image: torch.Tensor, classes: int, crop_h: int, crop_w: int,
                           stride_rate: float = 2 / 3, flip: bool = True, batch_size: int = 8,
                           channels_last: bool = False, amp: str = "off") -> torch.Tensor:
    """Class probabilities (classes, H, W) of one normalised 3xHxW image, on the image's device.

    `amp` (off | bf16 | fp16) is the precision of the network alone; its logits are cast back
    before the softmax.
    """
    _, h, w = image.shape
    padded, top, left = pad_to_window(image, crop_h, crop_w)
    ph, pw = padded.shape[1:]
    probs = torch.zeros(classes, ph, pw, device=image.device, dtype=image.dtype)
    rows, columns = window_offsets(ph, pw, crop_h, crop_w, stride_rate)
    grid = [(y, x) for y in rows for x in columns]
    per_forward = max(1, batch_size // 2) if flip else batch_size  # flips ride in the same batch
    for first in range(0, len(grid), per_forward):
        corners = grid[first:first + per_forward]
        crops = torch.stack([padded[:, y:y + crop_h, x:x + crop_w] for y, x in corners])
        batch = torch.cat([crops, crops.flip(3)]) if flip else crops
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(amp, image.device):
            logits = model(batch)
        logits = logits.to(image.dtype)
        if logits.shape[-2:] != (crop_h, crop_w):
            logits = F.interpolate(logits, (crop_h, crop_w), mode="bilinear", align_corners=True)
        out = logits.softmax(1)
        if flip:  # sum the flipped pair here and count it twice: one division at the end averages both
            n = len(corners)
            out = out[:n].add_(out[n:].flip(3))
        for (y, x), p in zip(corners, out):
            probs[:, y:y + crop_h, x:x + crop_w] += p
    # The windows form a grid, so the number covering a pixel is (rows covering y) x (columns covering x).
    # Only the two 1-D counts cross to the device; their outer product is formed there.
    count = torch.outer(window_coverage(ph, crop_h, rows).to(probs.device, probs.dtype),
                        window_coverage(pw, crop_w, columns).to(probs.device, probs.dtype))
    probs /= count * (2 if flip else 1)
    return probs[:, top:top + h, left:left + w]


def multi_scale_predict(model: torch.nn.Module, scaled_images: list[np.ndarray | torch.Tensor],
                        out_size: tuple[int, int], classes: int, crop_h: int, crop_w: int,
                        stride_rate: float = 2 / 3, flip: bool = True, batch_size: int = 0,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        channels_last: bool = False, amp: str = "off") -> torch.Tensor:
    """Mean over scales of the probability maps resized to out_size (H, W): (classes, H, W) on device."""
    batch_size = window_batch_size(batch_size, device)
    total = torch.zeros(classes, *out_size, device=device, dtype=dtype)
    for image in scaled_images:
        tensor = to_network_input(image, device, dtype)
        probs = sliding_window_predict(model, tensor, classes, crop_h, crop_w, stride_rate, flip, batch_size,
                                       channels_last, amp)
        if probs.shape[1:] != out_size:
            probs = F.interpolate(probs[None], out_size, mode="bilinear", align_corners=False)[0]
        total += probs
    return total / len(scaled_images)
