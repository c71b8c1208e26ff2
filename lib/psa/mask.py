"""Point-wise spatial attention mask re-arrangement (PSANet), in pure PyTorch.

PSANet predicts, at every pixel, a mask_h x mask_w window of attention weights centred on that
pixel. `psa_mask` spreads those windows into a dense (H*W) x (H*W) attention map:

- collect:    out[n, (h+i-half_h)*W + (w+j-half_w), h, w] = x[n, i*mask_w + j, h, w]
- distribute: out[n, h*W + w, h+i-half_h, w+j-half_w]     = x[n, i*mask_w + j, h, w]

with half = (mask - 1) // 2, for every window offset (i, j) that lands inside the map; every other
entry is 0. The reference implementation compiled this as a C++/CUDA extension; here it is one
index_select with an index tensor built once per geometry and cached, so it runs on any device and
dtype and autograd supplies the backward pass.

`psa_mask_reference` is the slow, literal loop definition: tests and tool/benchmark.py compare
against it. Do not use it in models.
"""
from functools import lru_cache
from typing import Union

import torch

PsaType = Union[str, int]
_TYPE_NAMES = {"collect": 0, "distribute": 1, 0: 0, 1: 1}


def _type_code(psa_type: PsaType) -> int:
    if isinstance(psa_type, bool) or psa_type not in _TYPE_NAMES:
        raise ValueError(f"psa_type must be 'collect', 'distribute', 0 or 1, got {psa_type!r}")
    return _TYPE_NAMES[psa_type]


def _check_geometry(x: torch.Tensor, mask_h: int, mask_w: int) -> None:
    for name, side in (("mask_h", mask_h), ("mask_w", mask_w)):
        if side < 1 or side % 2 == 0:
            raise ValueError(f"{name} must be a positive odd number, got {side}")
    if x.dim() != 4 or x.shape[1] != mask_h * mask_w:
        raise ValueError(
            f"psa_mask expects input (N, mask_h*mask_w={mask_h * mask_w}, H, W), got {tuple(x.shape)}"
        )


@lru_cache(maxsize=32)
def _gather_index(height: int, width: int, mask_h: int, mask_w: int, type_code: int,
                  device: torch.device) -> torch.Tensor:
    """Flat index into [x.flatten(1), 0] for every flat output entry; H*W*mask entries map to 0.

    Naming: `a` is the pixel where the window is anchored (the input's spatial position) and `b`
    the pixel the window offset points at. Collect writes out[b, a], distribute out[a, b]; both
    read x[(b - a) + half, a].
    """
    with torch.inference_mode(False):  # cached: an inference tensor here would break later backward passes
        return _build_gather_index(height, width, mask_h, mask_w, type_code, device)


def _build_gather_index(height: int, width: int, mask_h: int, mask_w: int, type_code: int,
                        device: torch.device) -> torch.Tensor:
    pixels = height * width
    ah = torch.arange(height, device=device).view(1, 1, height, 1)
    aw = torch.arange(width, device=device).view(1, 1, 1, width)
    bh = torch.arange(height, device=device).view(height, 1, 1, 1)
    bw = torch.arange(width, device=device).view(1, width, 1, 1)
    i = bh - ah + (mask_h - 1) // 2
    j = bw - aw + (mask_w - 1) // 2
    inside = (i >= 0) & (i < mask_h) & (j >= 0) & (j < mask_w)
    source = (i * mask_w + j) * pixels + (ah * width + aw)
    zero_slot = mask_h * mask_w * pixels
    index = torch.where(inside, source, torch.full_like(source, zero_slot)).view(pixels, pixels)
    if type_code == 1:
        index = index.t()
    return index.contiguous().view(-1)


def psa_mask(x: torch.Tensor, psa_type: PsaType, mask_h: int, mask_w: int) -> torch.Tensor:
    """Re-arrange (N, mask_h*mask_w, H, W) window weights into a dense (N, H*W, H, W) map.

    psa_type: 'collect' / 0 or 'distribute' / 1. mask_h and mask_w must be odd.
    """
    code = _type_code(psa_type)
    _check_geometry(x, mask_h, mask_w)
    n, _, height, width = x.shape
    # torch.export traces with fake tensors: a cached index built then would be fake in later eager calls.
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch < 2.5 has no is_exporting
    build = _build_gather_index if exporting else _gather_index
    index = build(height, width, mask_h, mask_w, code, x.device)
    padded = torch.cat([x.reshape(n, -1), x.new_zeros(n, 1)], dim=1)
    out = padded.index_select(1, index)
    return out.view(n, height * width, height, width)


def psa_mask_reference(x: torch.Tensor, psa_type: PsaType, mask_h: int, mask_w: int) -> torch.Tensor:
    """The literal definition, one pixel and one window offset at a time (slow; tests, benchmarks)."""
    code = _type_code(psa_type)
    _check_geometry(x, mask_h, mask_w)
    n, _, height, width = x.shape
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    out = x.new_zeros(n, height * width, height, width)
    for h in range(height):
        for w in range(width):
            for i in range(mask_h):
                for j in range(mask_w):
                    th, tw = h + i - half_h, w + j - half_w
                    if not (0 <= th < height and 0 <= tw < width):
                        continue
                    value = x[:, i * mask_w + j, h, w]
                    if code == 0:
                        out[:, th * width + tw, h, w] = value
                    else:
                        out[:, h * width + w, th, tw] = value
    return out
