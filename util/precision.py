"""Mixed precision by name, as TRAIN.amp and TEST.test_amp spell it: off | bf16 | fp16.

Autocast runs the network's matrix products and convolutions in the lower precision; losses,
softmax and the averaging of evaluation windows stay float32 in the callers. fp16 training also
needs a grad scaler (tool/train.py); bf16 has float32's range and needs none.
"""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(amp: str, device: torch.device | str):
    """torch.autocast for `amp` on the device's type; a context that changes nothing for off."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])
