"""The straightforward evaluation algorithm of semseg's test.py, kept as the yardstick.

One window at a time, numpy accumulation on the host, cv2 resizes: tests compare util.inference
against it (in float64) and tool/benchmark.py times it (in float32). Not used for evaluation.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from util.transform import MEAN, STD


def resize_channels(array: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.resize (linear) of an HxWxC array with any C: OpenCV 5 takes at most a few channels per
    call (semseg's OpenCV took 150), and resizing is per channel, so chunks give the same result."""
    chunks = [cv2.resize(array[..., i:i + 4], (w, h), interpolation=cv2.INTER_LINEAR)
              for i in range(0, array.shape[2], 4)]
    return np.concatenate([c.reshape(h, w, -1) for c in chunks], axis=2)


def reference_predict(model: torch.nn.Module, image: np.ndarray, classes: int, crop_h: int, crop_w: int,
                      base_size: int, scales: list[float], stride_rate: float = 2 / 3, flip: bool = True,
                      dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> np.ndarray:
    """semseg's algorithm, one window at a time; probabilities (H, W, classes) as float64 numpy.

    The model must already be in `dtype` on `device`; windows go to the device one by one and their
    softmax comes back to the host, as in the reference.
    """
    mean, std = np.array(MEAN), np.array(STD)

    def net_process(crop):
        x = (torch.from_numpy(crop.transpose(2, 0, 1)).double() - torch.tensor(mean).view(3, 1, 1)) \
            / torch.tensor(std).view(3, 1, 1)
        x = x.unsqueeze(0).to(device=device, dtype=dtype)
        if flip:
            x = torch.cat([x, x.flip(3)], 0)
        with torch.no_grad():
            out = model(x)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, x.shape[-2:], mode="bilinear", align_corners=True)
        out = F.softmax(out, dim=1)
        out = (out[0] + out[1].flip(2)) / 2 if flip else out[0]
        return out.double().cpu().numpy().transpose(1, 2, 0)

    def scale_process(img, h, w):
        ori_h, ori_w = img.shape[:2]
        pad_h, pad_w = max(crop_h - ori_h, 0), max(crop_w - ori_w, 0)
        ph, pw = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            img = cv2.copyMakeBorder(img, ph, pad_h - ph, pw, pad_w - pw, cv2.BORDER_CONSTANT, value=mean.tolist())
        new_h, new_w = img.shape[:2]
        sh, sw = int(math.ceil(crop_h * stride_rate)), int(math.ceil(crop_w * stride_rate))
        gh, gw = int(math.ceil(float(new_h - crop_h) / sh) + 1), int(math.ceil(float(new_w - crop_w) / sw) + 1)
        pred = np.zeros((new_h, new_w, classes), float)
        count = np.zeros((new_h, new_w), float)
        for ih in range(gh):
            for iw in range(gw):
                e_h, e_w = min(ih * sh + crop_h, new_h), min(iw * sw + crop_w, new_w)
                s_h, s_w = e_h - crop_h, e_w - crop_w
                count[s_h:e_h, s_w:e_w] += 1
                pred[s_h:e_h, s_w:e_w, :] += net_process(img[s_h:e_h, s_w:e_w].astype(np.float64))
        pred /= count[..., None]
        pred = pred[ph:ph + ori_h, pw:pw + ori_w]
        return resize_channels(pred, w, h)

    h, w = image.shape[:2]
    total = np.zeros((h, w, classes), float)
    for scale in scales:
        long_size = round(scale * base_size)
        new_h, new_w = (long_size, round(long_size / float(h) * w)) if h > w else (round(long_size / float(w) * h), long_size)
        total += scale_process(cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), h, w)
    return total / len(scales)
