"""Loud weight loading: every file problem or model mismatch becomes one readable message.

Accepted files (ImageNet backbones go through model/imagenet_convert.py instead):
- plain state dicts of a classification ResNet; their stem keys (conv1/bn1[/conv2/bn2/conv3/bn3])
  are renamed to layer0.* when the target is a segmentation model;
- full checkpoints {'state_dict': ..., 'epoch': ..., 'optimizer': ...}, with or without the
  'module.' prefix that DataParallel/DDP add.

A file may be named by an http(s) URL (TEST.model_path, TRAIN.weight): it is downloaded once into
torch.hub's cache and checked against the sha256 prefix in its name (util/download.py), here,
the one place every weight file passes through.

Files are read with torch.load(weights_only=True): a pickle holding arbitrary Python objects is
refused unless the caller opts in with trust_pickle=True.
"""
import logging
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from model.resnet import BACKBONE_MODULES
from util.checkpoint import epoch_checkpoints
from util.config import NO_FILE
from util.download import fetch_url, is_url
from util.errors import CheckpointError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
StateDict = Dict[str, torch.Tensor]

# Stem parameter names in a classification ResNet -> their index inside a segmentation net's layer0.
DEEP_STEM_NAMES = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3",
                   "bn2": "layer0.4", "conv3": "layer0.6", "bn3": "layer0.7"}
WIDE_STEM_NAMES = {"conv1": "layer0.0", "bn1": "layer0.1"}
CLASSIFIER_KEY = "cls.4.weight"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
LEGACY_PICKLE_START = b"\x80\x02\x8a\x0a"  # the older format: pickle protocol 2, then a long magic number
FILE_KINDS = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF document"),
              (b"\x1f\x8b", "a gzip archive"), (b"\x93NUMPY", "a NumPy array file"), (b"\x89HDF", "an HDF5 file"))
LISTED_NAMES = 6
REPO_ROOT = Path(__file__).resolve().parents[1]
SEMSEG_IMAGENET_FILE = "initmodel/resnet{layers}_v2.pth"  # semseg's default, under the repository root


def imagenet_weights_path(setting: str, layers: int, root: Path = REPO_ROOT) -> Optional[Path]:
    """The ImageNet file that TRAIN.pretrained_backbone names: the path given; when not set ('' or
    null), semseg's initmodel/resnet<layers>_v2.pth under the repository root, as semseg's PSPNet and
    PSANet load by default; None for `none`, the explicit opt-out (random weights)."""
    if setting == NO_FILE:
        return None
    return Path(setting) if setting else root / SEMSEG_IMAGENET_FILE.format(layers=layers)


@dataclass
class LoadReport:
    """What a load did: keys loaded, model keys left untouched, file keys not used, shape clashes."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (("missing from the file", self.missing), ("not in the model", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if names:
                shown = ", ".join(names[:LISTED_NAMES])
                more = f" ... and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
                parts.append(f"{title} ({len(names)}): {shown}{more}")
        return "; ".join(parts)


def load_checkpoint(path: PathLike, config_key: str, trust_pickle: bool = False) -> Any:
    """torch.load on CPU with weights_only unless trust_pickle, after checking that the file is a
    PyTorch checkpoint and, for the zip format, that its CRC-32s match; problems -> CheckpointError.
    A URL is replaced by its verified copy in torch.hub's cache."""
    path = fetch_url(path, config_key) if is_url(path) else Path(path)
    if path.is_dir():
        saved = epoch_checkpoints(path)
        example = saved[-1][1] if saved else path / "train_epoch_<n>.pth"
        raise CheckpointError(f"{config_key}: {path} is a folder; expected a checkpoint file, e.g. {example}")
    if not path.is_file():
        raise CheckpointError(f"{config_key}: weight file not found: {path}")
    check_integrity(path, config_key)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:
            raise CheckpointError(f"{config_key}: {path} is damaged: it is not a readable PyTorch checkpoint "
                                  f"({_unpickler_reason(error)})") from None
        raise CheckpointError(
            f"{config_key}: {path} contains arbitrary Python objects (e.g. {found.group(1)}), not just tensors; "
            f"loading was refused because unpickling them can run code. If the file is a legacy checkpoint "
            f"from a source you trust, opt in with TRAIN.trust_pickle True (or re-save it as a plain state dict)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{config_key}: {path} is damaged: it is not a readable PyTorch checkpoint "
                              f"({_first_line(error)})") from None


def check_integrity(path: Path, config_key: str) -> None:
    """Refuse a file that is not a checkpoint at all, and a zip-format checkpoint whose content
    no longer matches the CRC-32 that torch.save wrote for each of its records (bit rot, a
    damaged copy). Legacy (pre-zip) pickles and files saved without CRC-32s carry no checksum and are
    only checked by loading."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head == LEGACY_PICKLE_START:
        return
    if head != ZIP_MAGIC:
        onnx = "; an ONNX export runs through TEST.onnx_path" if path.suffix == ".onnx" else ""
        raise CheckpointError(f"{config_key}: {path} is not a PyTorch checkpoint ({_describe_content(path)}); "
                              f"expected a file written by torch.save, such as train_epoch_<n>.pth{onnx}")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(record.CRC for record in archive.infolist() if record.file_size):
                return  # saved with torch.serialization.set_crc32_options(False): no checksums to compare
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, ValueError, struct.error) as error:
        # a damaged header can also claim an unknown compression method or impossible sizes
        raise CheckpointError(f"{config_key}: {path} is damaged or truncated: its zip structure cannot be read "
                              f"({_first_line(error)}); use another copy or an earlier checkpoint") from None
    if damaged is not None:
        raise CheckpointError(f"{config_key}: {path} is damaged: its record {damaged} does not match the "
                              f"checksum written when it was saved; use another copy or an earlier checkpoint")


def _describe_content(path: Path) -> str:
    """A few words on what a non-checkpoint file holds, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, kind in FILE_KINDS:
        if head.startswith(magic):
            return f"it is {kind}"
    if not head:
        return "it is empty"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the 512-byte boundary
            return "unrecognised binary content"
    return "it is a text file"


def load_state_dict_file(path: PathLike, config_key: str, trust_pickle: bool = False) -> StateDict:
    """The state dict inside a weight file, 'module.' prefixes removed."""
    return extract_state_dict(load_checkpoint(path, config_key, trust_pickle), path, config_key)


def extract_state_dict(checkpoint: Any, path: PathLike, config_key: str) -> StateDict:
    """Unwrap {'state_dict': ...} and strip DataParallel's 'module.' prefix."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(checkpoint)[:LISTED_NAMES] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{config_key}: {path} holds no state dict (expected a dict of tensors or "
                              f"{{'state_dict': ...}}; found {found})")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def load_model_weights(model: nn.Module, path: PathLike, config_key: str, strict: bool = True,
                       trust_pickle: bool = False) -> LoadReport:
    """Load a full segmentation checkpoint file (see load_model_state)."""
    return load_model_state(model, load_checkpoint(path, config_key, trust_pickle), path, config_key, strict)


def load_model_state(model: nn.Module, checkpoint: Any, path: PathLike, config_key: str,
                     strict: bool = True) -> LoadReport:
    """Put the weights of an already loaded checkpoint (from `path`) into the model.

    A different class count or any shape clash is a CheckpointError; missing/unexpected keys are one
    when strict, else a warning (still an error when most of the backbone would stay random).
    """
    model_state = model.state_dict()
    state = _to_model_names(extract_state_dict(checkpoint, path, config_key), model_state, path, config_key)
    _check_class_count(state, model_state, path)
    report = _compare(state, model_state)
    if report.mismatched or (strict and not report.clean()):
        raise CheckpointError(f"{config_key}: {path} does not fit the model: {report.describe()}")
    backbone = {key: value for key, value in model_state.items() if _is_backbone_key(key, model_state)}
    _require_most_of_backbone(report, backbone, path, config_key)
    return _apply(model, state, report, path, config_key)


def _unpickler_reason(error: Exception) -> str:
    """What torch's weights-only unpickler found, without its advice to load with weights_only=False."""
    _, marker, rest = str(error).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    return lines[0] if marker and lines else "its pickled content cannot be read"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_segmentation_state(model_state: StateDict) -> bool:
    return "layer0.0.weight" in model_state


def _is_backbone_key(key: str, model_state: StateDict) -> bool:
    if _is_segmentation_state(model_state):
        return key.split(".", 1)[0] in BACKBONE_MODULES
    return not key.startswith("fc.")


def _to_model_names(state: StateDict, model_state: StateDict, path: PathLike, config_key: str) -> StateDict:
    """Rename a classification ResNet's stem keys to layer0.* for a segmentation model."""
    if "conv1.weight" not in state or not _is_segmentation_state(model_state):
        return state
    file_deep = "conv2.weight" in state
    model_deep = "layer0.3.weight" in model_state
    if file_deep != model_deep:
        stems = {True: "a deep 3x3 stem", False: "a 7x7 stem"}
        raise CheckpointError(f"{config_key}: {path} has {stems[file_deep]} but the model has {stems[model_deep]}; "
                              f"set TRAIN.deep_stem to {file_deep} or use matching weights")
    names = DEEP_STEM_NAMES if file_deep else WIDE_STEM_NAMES
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        renamed[f"{names[head]}.{rest}" if head in names else key] = value
    return renamed


def _compare(state: StateDict, targets: StateDict) -> LoadReport:
    report = LoadReport()
    for key, value in targets.items():
        if key not in state:
            # Older files lack BN's num_batches_tracked; it only counts momentum-free updates.
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
        elif tuple(state[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key} (file {_shape(state[key])}, model {_shape(value)})")
        else:
            report.loaded.append(key)
    report.unexpected = [key for key in state if key not in targets]
    return report


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(d) for d in tensor.shape) or "scalar"


def _check_class_count(state: StateDict, model_state: StateDict, path: PathLike) -> None:
    if CLASSIFIER_KEY not in state or CLASSIFIER_KEY not in model_state:
        return
    file_classes, model_classes = state[CLASSIFIER_KEY].shape[0], model_state[CLASSIFIER_KEY].shape[0]
    if file_classes != model_classes:
        raise CheckpointError(f"checkpoint {path} has {file_classes} classes ({CLASSIFIER_KEY} "
                              f"{_shape(state[CLASSIFIER_KEY])}) but DATA.classes is {model_classes}")


def _require_most_of_backbone(report: LoadReport, backbone: StateDict, path: PathLike, config_key: str) -> None:
    """Counted in parameter elements, so matching BN vectors cannot hide mismatched conv kernels."""
    total = sum(value.numel() for value in backbone.values())
    loaded = sum(backbone[key].numel() for key in report.loaded if key in backbone)
    if loaded * 2 < total:
        raise CheckpointError(f"{config_key}: {path} would leave most of the backbone uninitialised "
                              f"({100 * loaded // max(total, 1)}% of its weights match): {report.describe()}")


def _apply(model: nn.Module, state: StateDict, report: LoadReport, path: PathLike, config_key: str) -> LoadReport:
    model.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    if report.clean():
        logger.info("%s: loaded %d tensors from %s", config_key, len(report.loaded), path)
    else:
        logger.warning("%s: %s: %s", config_key, path, report.describe())
    return report
