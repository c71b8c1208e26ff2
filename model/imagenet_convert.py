"""ImageNet weights of a ResNet in any published layout -> semseg's layout, checked: the one path
that both tool/prepare_weights.py and TRAIN.pretrained_backbone take.

Layouts, told apart by their keys:
- timm: timm's resnet<N>s / gluon_resnet<N>_v1s and PyTorch-Encoding's resnet<N>s. The stem is
  one Sequential `conv1` (conv1.0 conv, conv1.1 BN, conv1.3 conv, conv1.4 BN, conv1.6 conv) and
  `bn1` is the BN after it, on 128 channels; layer1..4 and fc as ours.
- semseg: semseg's own files, ours (prepare_weights' output) and CSAIL's resnet<N>-imagenet.pth:
  conv1, bn1, conv2, bn2, conv3, bn3.
- mit_semseg: the semseg layout as CSAIL's mit_semseg code saves it: its SynchronizedBatchNorm
  adds three buffers to every BN (MIT_SEMSEG_BUFFERS), dropped here.
- torchvision: one 7x7 conv1 and bn1, for a model built with TRAIN.deep_stem False.
Files: a torch.save .pth (read weights-only), a .safetensors, or Encoding's .zip holding one .pth.

The result has exactly the keys and shapes of the target backbone (fc.* kept only when the target
has fc), and is refused, in one line naming the missing and the extra keys and the likely cause
(another depth, another stem, a classification head only), unless every backbone tensor is filled
with the right shape and nothing but fc and the mit_semseg buffers is left over; also refused when
a BatchNorm still has its untouched statistics (mean 0, variance 1: never trained or not copied).
"""
from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from model.resnet import BACKBONE_MODULES, BLOCKS_PER_DEPTH, Bottleneck, build_resnet
from model.weights import (DEEP_STEM_NAMES, LISTED_NAMES, WIDE_STEM_NAMES, LoadReport, extract_state_dict,
                           load_checkpoint)
from util.download import fetch_url, is_url
from util.errors import CheckpointError

logger = logging.getLogger(__name__)
StateDict = Dict[str, torch.Tensor]
TIMM_STEM = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2", "conv1.6": "conv3",
             "bn1": "bn3"}
MIT_SEMSEG_BUFFERS = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")
CLASSIFIER = "fc."
BN_STATISTICS = "running_var"


def read_weight_file(path: str | Path, what: str = "--from-file", trust_pickle: bool = False) -> StateDict:
    """The tensors of a .pth, .safetensors or Encoding .zip file (or URL), by its suffix."""
    path = fetch_url(path, what) if is_url(path) else Path(path)
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
            return extract_state_dict(load_checkpoint(zip_member(path, folder, what), what, trust_pickle), path, what)
    return extract_state_dict(load_checkpoint(path, what, trust_pickle), path, what)


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
    """timm, semseg, mit_semseg or torchvision (see the module doc); anything else is one
    CheckpointError saying what it is."""
    if {"conv1.0.weight", "conv1.6.weight", "bn1.weight"} <= state.keys():
        return "timm"
    if "conv1.weight" in state and any(key.startswith("layer1.") for key in state):
        if any(key.endswith(MIT_SEMSEG_BUFFERS) for key in state):
            return "mit_semseg"
        return "semseg" if "conv2.weight" in state else "torchvision"
    if "layer0.0.weight" in state:
        found = "a segmentation checkpoint (layer0...), not ImageNet weights; it is a TRAIN.weight"
    elif state and all(key.startswith(CLASSIFIER) for key in state):
        found = f"a classification head only ({', '.join(list(state)[:LISTED_NAMES])}), no backbone"
    else:
        found = f"no known ResNet layout (first keys: {', '.join(list(state)[:LISTED_NAMES])})"
    raise CheckpointError(f"{path}: {found}; expected a ResNet in timm/Encoding layout (conv1.0 ... conv1.6, bn1) "
                          f"or semseg/CSAIL layout (conv1, bn1, conv2, bn2, conv3, bn3)")


def detect_depth(state: StateDict) -> int | None:
    """The ResNet depth from the number of blocks in layer1..4 and their kind, None if unknown."""
    counts = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(key.endswith(".conv3.weight") for key in state if key.startswith("layer1."))
    for layers, (block, blocks) in BLOCKS_PER_DEPTH.items():
        if tuple(blocks) == counts and (block is Bottleneck) == bottleneck:
            return layers
    return None


def to_semseg_names(state: StateDict, layout: str) -> StateDict:
    """The file's tensors under semseg's classification names; mit_semseg's SyncBN buffers dropped."""
    if layout == "timm":
        renamed = {}
        for key, value in state.items():
            module, _, rest = key.rpartition(".")
            renamed[f"{TIMM_STEM.get(module, module)}.{rest}"] = value
        return renamed
    return {key: value for key, value in state.items() if not key.endswith(MIT_SEMSEG_BUFFERS)}


def _stem(state: StateDict) -> str:
    return "a deep 3x3 stem" if "conv2.weight" in state else "a 7x7 stem"


def likely_cause(file: StateDict, targets: StateDict, layout: str, setting: str) -> str:
    """Why a file (in semseg's names) does not fit the target backbone, as far as the keys tell."""
    causes = []
    depth, wanted = detect_depth(file), detect_depth(targets)
    if depth != wanted:
        found = f"ResNet-{depth}" if depth else "a ResNet of no standard depth"
        causes.append(f"it holds {found} ({layout} layout), not the ResNet-{wanted} asked for with {setting} {wanted}")
    if _stem(file) != _stem(targets):
        causes.append(f"it has {_stem(file)} but the model has {_stem(targets)}; set TRAIN.deep_stem to "
                      f"{'conv2.weight' in file} or use matching weights")
    return "; and ".join(causes) or "a damaged or partial file, or another architecture"


def fit_backbone(state: StateDict, targets: StateDict, path: str | Path, setting: str) -> tuple[StateDict, str]:
    """`state` (any layout above) under the names of `targets` (a classification ResNet's state dict,
    fc.* optional), checked; also the layout found. `setting` names the depth's setting in messages
    (`--layers`, `TRAIN.layers`)."""
    layout = detect_layout(state, path)
    file = to_semseg_names(state, layout)
    renamed = dict(file)
    for key, value in targets.items():  # older files lack BN's counter; it is no learned value
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros((), dtype=value.dtype)
    missing = [key for key in targets if key not in renamed and not key.startswith(CLASSIFIER)]
    extra = [key for key in renamed if key not in targets and not key.startswith(CLASSIFIER)]
    clashes = [f"{key} (file {tuple(renamed[key].shape)}, model {tuple(value.shape)})"
               for key, value in targets.items() if key in renamed and renamed[key].shape != value.shape]
    if missing or extra or clashes:
        parts = [f"{len(names)} {title} ({', '.join(names[:LISTED_NAMES])}{' ...' if len(names) > LISTED_NAMES else ''})"
                 for title, names in (("missing", missing), ("extra", extra), ("of another shape", clashes)) if names]
        raise CheckpointError(f"{path} does not fit the backbone after conversion from the {layout} layout: "
                              f"{'; '.join(parts)}; likely cause: {likely_cause(file, targets, layout, setting)}")
    untouched = [key.rpartition(".")[0] for key in renamed if key.endswith(BN_STATISTICS)
                 and _default_statistics(renamed, key.rpartition(".")[0])]
    if untouched:
        raise CheckpointError(f"{path}: {len(untouched)} BatchNorm layer(s) still have their initial statistics "
                              f"(mean 0, variance 1), so they were never trained: "
                              f"{', '.join(untouched[:LISTED_NAMES])}")
    return {key: renamed[key].contiguous() for key in targets if key in renamed}, layout


def convert_imagenet_weights(state: StateDict, layers: int, path: str | Path) -> StateDict:
    """`state` (any layout above) as semseg's deep-stem ResNet-<layers> state dict, checked
    (tool/prepare_weights.py --layers)."""
    with torch.device("meta"):
        targets = build_resnet(layers, deep_stem=True).state_dict()
    return fit_backbone(state, targets, path, "--layers")[0]


def load_backbone_weights(model: nn.Module, path: str | Path, config_key: str,
                          trust_pickle: bool = False) -> LoadReport:
    """Fill every backbone tensor of `model` (a segmentation net's layer0..layer4, or a
    classification ResNet but fc) from an ImageNet file in any layout above, or stop with one
    CheckpointError; the file's fc.* is not used. Logs the layout found."""
    model_state = model.state_dict()
    segmentation = "layer0.0.weight" in model_state
    stem_names = DEEP_STEM_NAMES if "layer0.3.weight" in model_state else WIDE_STEM_NAMES
    to_model = {theirs: ours for ours, theirs in stem_names.items()} if segmentation else {}
    targets = {}
    for key, value in model_state.items():
        module, _, rest = key.rpartition(".")
        if segmentation and key.split(".", 1)[0] in BACKBONE_MODULES:
            targets[f"{to_model.get(module, module)}.{rest}"] = value
        elif not segmentation and not key.startswith(CLASSIFIER):
            targets[key] = value
    try:
        state, layout = fit_backbone(read_weight_file(path, config_key, trust_pickle), targets, path, "TRAIN.layers")
    except CheckpointError as error:
        raise CheckpointError(f"{config_key}: {error}") from None
    renamed = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".")
        renamed[f"{stem_names.get(module, module) if segmentation else module}.{rest}"] = value
    model.load_state_dict(renamed, strict=False)
    logger.info("%s: loaded %d tensors from %s (%s layout), every backbone tensor", config_key, len(renamed), path,
                layout)
    return LoadReport(loaded=list(renamed))


def _default_statistics(state: StateDict, layer: str) -> bool:
    mean, var = state[f"{layer}.running_mean"], state[f"{layer}.running_var"]
    return bool(torch.all(mean == 0)) and bool(torch.all(var == 1))
