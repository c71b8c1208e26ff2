"""ImageNet weights of a deep-stem ResNet in any published layout -> semseg's layout, checked.

Layouts, told apart by their keys:
- timm: timm's resnet<N>s / gluon_resnet<N>_v1s and PyTorch-Encoding's resnet<N>s. The stem is
  one Sequential `conv1` (conv1.0 conv, conv1.1 BN, conv1.3 conv, conv1.4 BN, conv1.6 conv) and
  `bn1` is the BN after it, on 128 channels; layer1..4 and fc as ours.
- semseg: semseg's own files and CSAIL's resnet<N>-imagenet.pth: conv1, bn1, conv2, bn2, conv3, bn3.
Files: a torch.save .pth (read weights-only), a .safetensors, or Encoding's .zip holding one .pth.

The result has exactly the keys and shapes of model.resnet's deep-stem ResNet (semseg's
initmodel/resnet<layers>_v2.pth, fc.* included when the file has it), and is refused unless every
backbone tensor is filled with the right shape, nothing but fc is left over, and no BatchNorm
still has its untouched statistics (mean 0, variance 1: a layer never trained or not copied).
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Dict

import torch

from model.resnet import BLOCKS_PER_DEPTH, Bottleneck, build_resnet
from model.weights import LISTED_NAMES, extract_state_dict, load_checkpoint
from util.errors import CheckpointError

StateDict = Dict[str, torch.Tensor]
TIMM_STEM = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2", "conv1.6": "conv3",
             "bn1": "bn3"}
CLASSIFIER = "fc."
BN_STATISTICS = "running_var"


def read_weight_file(path: str | Path, what: str = "--from-file") -> StateDict:
    """The tensors of a .pth, .safetensors or Encoding .zip file, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{what}: {path} is not a readable .safetensors file ({error})") from None
    if path.suffix == ".zip":
        with tempfile.TemporaryDirectory() as folder:
            return extract_state_dict(load_checkpoint(zip_member(path, folder, what), what), path, what)
    return extract_state_dict(load_checkpoint(path, what), path, what)


def zip_member(path: Path, folder: str, what: str) -> Path:
    """Extract the one .pth of an Encoding zip (resnet50s-a75c83cf.zip) into `folder`."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [name for name in archive.namelist() if name.endswith(".pth")]
            if len(members) != 1:
                raise CheckpointError(f"{what}: {path} should hold one .pth file, as PyTorch-Encoding's zips do; "
                                      f"it holds {archive.namelist()[:LISTED_NAMES]}")
            return Path(archive.extract(members[0], folder))
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{what}: {path} is not a readable zip archive ({error})") from None


def detect_layout(state: StateDict, path: str | Path) -> str:
    """timm or semseg (see the module doc); anything else is one CheckpointError saying what it is."""
    if {"conv1.0.weight", "conv1.6.weight", "bn1.weight"} <= state.keys():
        return "timm"
    if {"conv1.weight", "conv2.weight", "conv3.weight", "bn3.weight"} <= state.keys():
        return "semseg"
    if "layer0.0.weight" in state:
        found = "a segmentation checkpoint (layer0...), not ImageNet weights; it is a TRAIN.weight"
    elif "conv1.weight" in state and tuple(state["conv1.weight"].shape[2:]) == (7, 7):
        found = "a ResNet with a 7x7 stem (torchvision's), not the deep 3x3 stem semseg's PSPNet/PSANet use"
    else:
        found = f"no known ResNet layout (first keys: {', '.join(list(state)[:LISTED_NAMES])})"
    raise CheckpointError(f"{path}: {found}; expected a deep-stem ResNet in timm/Encoding layout (conv1.0 ... "
                          f"conv1.6, bn1) or semseg/CSAIL layout (conv1, bn1, conv2, bn2, conv3, bn3)")


def detect_depth(state: StateDict) -> int | None:
    """The ResNet depth from the number of blocks in layer1..4 and their kind, None if unknown."""
    counts = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(key.endswith(".conv3.weight") for key in state if key.startswith("layer1."))
    for layers, (block, blocks) in BLOCKS_PER_DEPTH.items():
        if tuple(blocks) == counts and (block is Bottleneck) == bottleneck:
            return layers
    return None


def to_semseg_names(state: StateDict, layout: str) -> StateDict:
    if layout == "semseg":
        return dict(state)
    renamed = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".")
        renamed[f"{TIMM_STEM.get(module, module)}.{rest}"] = value
    return renamed


def convert_imagenet_weights(state: StateDict, layers: int, path: str | Path) -> StateDict:
    """`state` (any layout above) as semseg's deep-stem ResNet-<layers> state dict, checked."""
    layout = detect_layout(state, path)
    depth = detect_depth(state)
    if depth != layers:
        found = f"ResNet-{depth}" if depth else "a ResNet of no standard depth"
        raise CheckpointError(f"{path} holds {found} ({layout} layout), not the ResNet-{layers} asked for with "
                              f"--layers {layers}")
    with torch.device("meta"):
        targets = build_resnet(layers, deep_stem=True).state_dict()
    renamed = to_semseg_names(state, layout)
    for key, value in targets.items():  # older files lack BN's counter; it is no learned value
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros((), dtype=value.dtype)
    missing = [key for key in targets if key not in renamed and not key.startswith(CLASSIFIER)]
    left = [key for key in renamed if key not in targets]
    clashes = [f"{key} (file {tuple(renamed[key].shape)}, ResNet-{layers} {tuple(value.shape)})"
               for key, value in targets.items() if key in renamed and renamed[key].shape != value.shape]
    for title, names in (("missing", missing), ("left over", left), ("of the wrong shape", clashes)):
        if names:
            raise CheckpointError(f"{path}: {len(names)} tensor(s) {title} after conversion from the {layout} "
                                  f"layout: {', '.join(names[:LISTED_NAMES])}")
    untouched = [key.rpartition(".")[0] for key in renamed if key.endswith(BN_STATISTICS)
                 and _default_statistics(renamed, key.rpartition(".")[0])]
    if untouched:
        raise CheckpointError(f"{path}: {len(untouched)} BatchNorm layer(s) still have their initial statistics "
                              f"(mean 0, variance 1), so they were never trained: "
                              f"{', '.join(untouched[:LISTED_NAMES])}")
    return {key: renamed[key].contiguous() for key in targets if key in renamed}


def _default_statistics(state: StateDict, layer: str) -> bool:
    mean, var = state[f"{layer}.running_mean"], state[f"{layer}.running_var"]
    return bool(torch.all(mean == 0)) and bool(torch.all(var == 1))
