"""Typed YAML configuration with semseg's sections and keys, flattened for access (cfg.base_lr).

Every setting is declared once in SCHEMA with its type, default and a one-line doc; unknown keys
(in a file or an override) are errors that suggest the closest valid key. A config may inherit
from others with `_base_: path` (or a list of paths), relative to the file; later files override
earlier ones key by key. Command-line overrides are `SECTION.key value` pairs or `SECTION.key=value`,
values parsed as YAML literals, as in semseg. A path key written with no value (YAML null, as
semseg's configs write `weight:` and `resume:`) is not set by that file (a base's value or the
default stays); `none` (any case) means no file: not set, except for TRAIN.pretrained_backbone,
where not set means semseg's default ImageNet file and `none` an explicit start from random weights.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from util.errors import ConfigError

logger = logging.getLogger(__name__)
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "config"  # the shipped configs, for suggestions

SECTIONS = ("DATA", "TRAIN", "Distributed", "TEST")
REQUIRED = object()  # default of keys that every config must set
NO_FILE = "none"  # a path key's value meaning "no file": not set, except where it is a setting of its own
NO_FILE_IS_A_SETTING = ("pretrained_backbone",)  # not set = a default file; none = none at all
# YAML 1.1 reads 1e-4 and 1e10 (no dot) as strings; semseg's literal parsing read them as numbers.
NEGATIVE_VALUE = re.compile(r"-\.?\d")  # a negative number after a key, not an option
EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class Field:
    section: str
    name: str
    kind: str  # int | float | bool | str | path | int_list | float_list | int_map
    default: Any
    doc: str
    choices: tuple = ()
    optional: bool = False  # None (YAML null) is allowed


def _f(section, name, kind, default, doc, choices=(), optional=False):
    return Field(section, name, kind, default, doc, tuple(choices), optional)


SCHEMA: tuple[Field, ...] = (
    # DATA: where the samples are and how labels map to classes.
    _f("DATA", "data_root", "path", REQUIRED, "folder that list-file paths are relative to"),
    _f("DATA", "train_list", "path", "", "list file of training pairs `image label`"),
    _f("DATA", "val_list", "path", "", "list file of validation pairs"),
    _f("DATA", "classes", "int", REQUIRED, "number of classes; labels are 0..classes-1 or ignore_label"),
    _f("DATA", "reduce_zero_label", "bool", False, "raw label 0 -> ignore, x -> x-1 (ADE20K raw annotations)"),
    _f("DATA", "label_map", "int_map", None, "raw id -> train id; ids not listed become ignore_label",
       optional=True),
    _f("DATA", "allow_unsafe_paths", "bool", False,
       "allow list entries that are absolute or leave data_root with `..`"),
    # TRAIN: model, augmentation, optimisation, checkpoints.
    _f("TRAIN", "arch", "str", "psp", "network: psp (PSPNet) or psa (PSANet)", ("psp", "psa")),
    _f("TRAIN", "layers", "int", 50, "ResNet depth of the backbone", (18, 34, 50, 101, 152)),
    _f("TRAIN", "deep_stem", "bool", True, "three 3x3 stem convs (semseg) instead of one 7x7"),
    _f("TRAIN", "bins", "int_list", [1, 2, 3, 6], "PSPNet pyramid pooling bin sizes"),
    _f("TRAIN", "dropout", "float", 0.1, "Dropout2d probability before the classifiers"),
    _f("TRAIN", "pretrained_backbone", "path", "",
       "ImageNet weights (.pth) of the backbone for a fresh run; not set = semseg's "
       "initmodel/resnet{layers}_v2.pth under the repository root; none = random weights"),
    _f("TRAIN", "sync_bn", "bool", True, "synchronise BatchNorm statistics across processes"),
    _f("TRAIN", "train_h", "int", 473, "training crop height, 8k+1"),
    _f("TRAIN", "train_w", "int", 473, "training crop width, 8k+1"),
    _f("TRAIN", "scale_min", "float", 0.5, "minimum random scale"),
    _f("TRAIN", "scale_max", "float", 2.0, "maximum random scale"),
    _f("TRAIN", "rotate_min", "float", -10.0, "minimum random rotation in degrees"),
    _f("TRAIN", "rotate_max", "float", 10.0, "maximum random rotation in degrees"),
    _f("TRAIN", "zoom_factor", "int", 8, "output upsampling of the 1/8 features; 8 = full-resolution labels",
       (1, 2, 4, 8)),
    _f("TRAIN", "ignore_label", "int", 255, "label value ignored by loss and metrics"),
    _f("TRAIN", "aux_weight", "float", 0.4, "weight of the auxiliary (layer3) loss"),
    _f("TRAIN", "train_gpu", "int_list", [], "GPUs for a single-node spawn launch; [] = all visible"),
    _f("TRAIN", "workers", "int", -1, "data-loader workers per node, split across processes; -1 = auto"),
    _f("TRAIN", "batch_size", "int", 16, "global training batch, split across processes and accum_steps"),
    _f("TRAIN", "batch_size_val", "int", 8, "global validation batch"),
    _f("TRAIN", "accum_steps", "int", 1, "micro-batches accumulated per optimizer step"),
    _f("TRAIN", "base_lr", "float", 0.01, "learning rate of the backbone; new modules use 10x"),
    _f("TRAIN", "epochs", "int", 100, "training epochs"),
    _f("TRAIN", "start_epoch", "int", 0, "first epoch (overridden by resume)"),
    _f("TRAIN", "power", "float", 0.9, "poly learning-rate decay power"),
    _f("TRAIN", "momentum", "float", 0.9, "SGD momentum"),
    _f("TRAIN", "weight_decay", "float", 1e-4, "SGD weight decay"),
    _f("TRAIN", "manual_seed", "int", None, "seed for weights, sampling and augmentation; null = random",
       optional=True),
    _f("TRAIN", "print_freq", "int", 10, "log a line every N optimizer steps"),
    _f("TRAIN", "save_freq", "int", 1, "save a checkpoint every N epochs"),
    _f("TRAIN", "save_path", "path", "exp/model", "folder for checkpoints, logs and TensorBoard events"),
    _f("TRAIN", "keep_checkpoints", "int", 2, "how many recent epoch checkpoints to keep (plus the best)"),
    # A SIGKILL (dead node, out-of-memory kill) loses at most this much work. 30 minutes costs little
    # (an ADE20K PSPNet-50 checkpoint, ~0.4 GB, takes seconds to write) on a shared cluster whose
    # jobs are preempted and requeued; a SIGTERM or SIGUSR1 always saves the exact iteration anyway.
    _f("TRAIN", "checkpoint_minutes", "float", 30.0,
       "save a mid-epoch checkpoint (only the newest is kept) at least every N minutes; 0 = only at epoch ends"),
    _f("TRAIN", "weight", "path", "", "full model weights to start from (fine-tuning); '' = none"),
    _f("TRAIN", "resume", "path", "", "checkpoint to resume from, or `auto` for the latest in save_path"),
    _f("TRAIN", "trust_pickle", "bool", False,
       "allow loading legacy checkpoints that contain arbitrary Python objects (runs their code)"),
    _f("TRAIN", "evaluate", "bool", False, "evaluate on val_list after every epoch"),
    _f("TRAIN", "amp", "str", "off", "mixed precision: off, fp16 (with grad scaler) or bf16", ("off", "fp16", "bf16")),
    _f("TRAIN", "channels_last", "bool", False, "use channels_last memory format"),
    _f("TRAIN", "compile", "bool", False, "torch.compile the model (pays off on long GPU runs)"),
    _f("TRAIN", "psa_type", "int", 2, "PSA branches: 0 collect, 1 distribute, 2 both", (0, 1, 2)),
    _f("TRAIN", "compact", "bool", False, "PSA compact mask (attention read directly as the mask)"),
    _f("TRAIN", "shrink_factor", "int", 2, "PSA feature downsampling before attention"),
    _f("TRAIN", "mask_h", "int", None, "PSA mask height, odd; null = derived from train_h", optional=True),
    _f("TRAIN", "mask_w", "int", None, "PSA mask width, odd; null = derived from train_w", optional=True),
    _f("TRAIN", "normalization_factor", "float", 1.0, "PSA aggregation divisor"),
    _f("TRAIN", "psa_softmax", "bool", True, "softmax over the PSA mask"),
    # Distributed: how processes find each other when not launched by torchrun or SLURM.
    _f("Distributed", "dist_url", "str", "tcp://127.0.0.1:6789", "rendezvous URL for the spawn launch"),
    _f("Distributed", "dist_backend", "str", "auto", "auto (nccl on GPU, gloo on CPU), nccl or gloo",
       ("auto", "nccl", "gloo")),
    _f("Distributed", "multiprocessing_distributed", "bool", True, "one process per GPU when launched as plain python"),
    _f("Distributed", "world_size", "int", 1, "number of nodes for the spawn launch"),
    _f("Distributed", "rank", "int", 0, "this node's rank for the spawn launch"),
    _f("Distributed", "dist_timeout", "int", 600, "seconds a collective may wait for a dead peer before the job fails"),
    # TEST: evaluation (tool/test.py) and demo.
    _f("TEST", "test_list", "path", "", "list file to evaluate"),
    _f("TEST", "split", "str", "val", "train/val have labels and are scored; test is predicted only",
       ("train", "val", "test")),
    _f("TEST", "base_size", "int", 512, "long side of the image at scale 1.0"),
    _f("TEST", "test_h", "int", 473, "sliding-window height, 8k+1"),
    _f("TEST", "test_w", "int", 473, "sliding-window width, 8k+1"),
    _f("TEST", "scales", "float_list", [1.0], "evaluation scales, averaged"),
    _f("TEST", "flip", "bool", True, "average each window with its horizontal flip"),
    _f("TEST", "stride_rate", "float", 2.0 / 3.0, "window stride as a fraction of the window"),
    _f("TEST", "test_batch_size", "int", 0, "windows (flips included) per network forward; 0 = 8 on GPU, 2 on CPU"),
    _f("TEST", "test_amp", "str", "off", "precision of the network in evaluation: off (float32), bf16 or fp16; "
       "softmax and averaging stay float32", ("off", "fp16", "bf16")),
    _f("TEST", "has_prediction", "bool", False, "score the PNGs already in save_folder/gray without a model"),
    _f("TEST", "index_start", "int", 0, "first list line to evaluate"),
    _f("TEST", "index_step", "int", 0, "number of list lines to evaluate; 0 = to the end"),
    _f("TEST", "model_path", "path", "", "checkpoint to evaluate"),
    _f("TEST", "onnx_path", "path", "", "ONNX file (tool/export.py) to run in onnxruntime instead of model_path"),
    _f("TEST", "save_folder", "path", "exp/result", "where gray/, color/ and the scores go"),
    _f("TEST", "colors_path", "path", "", "class colours, one `R G B` per line"),
    _f("TEST", "names_path", "path", "", "class names, one per line"),
    _f("TEST", "vis_count", "int", 4, "side-by-side image|prediction PNGs for the first N images of a split "
       "without labels (labelled splits: the TEST.report_worst worst images)"),
    _f("TEST", "report_worst", "int", 20, "worst images (lowest mIoU) shown in save_folder/report.html and vis/"),
    _f("TEST", "submission_format", "str", "none", "also write predictions as a benchmark server expects, "
       "in save_folder/submission", ("none", "ade20k", "cityscapes", "voc")),
)
FIELDS: dict[str, Field] = {f.name: f for f in SCHEMA}

# Keys of semseg configs that this codebase replaces: accepted so old YAMLs load, then ignored.
LEGACY_KEYS = {
    "use_apex": "mixed precision is TRAIN.amp (off | fp16 | bf16)",
    "opt_level": "mixed precision is TRAIN.amp (off | fp16 | bf16)",
    "keep_batchnorm_fp32": "torch.autocast keeps BatchNorm in float32",
    "loss_scale": "TRAIN.amp fp16 uses a dynamic grad scaler",
    "test_gpu": "tool/test.py runs on the GPU of its local rank; choose it with CUDA_VISIBLE_DEVICES",
}


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def nearest_config(path: Path, root: Path = CONFIG_ROOT) -> str:
    """`; did you mean <config>?` naming the shipped configs (root/**/*.yaml, bases left out)
    closest to a path that does not exist, as the user would type them from the current folder."""
    def as_typed(file: Path) -> str:  # relative to the current folder when below it, else absolute
        relative = os.path.relpath(file.resolve())
        return str(file.resolve()) if relative.startswith("..") else relative

    shipped = [as_typed(found) for found in sorted(root.rglob("*.yaml")) if "_base_" not in found.relative_to(root).parts]
    return _suggest(as_typed(path), shipped)


def _type_name(field: Field) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "path": "a path",
             "int_list": "a list of integers", "float_list": "a list of numbers",
             "int_map": "a mapping of integer -> integer"}
    text = names[field.kind]
    if field.choices:
        text += " in " + ", ".join(str(c) for c in field.choices)
    return text + (" or null" if field.optional else "")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_number(v: Any) -> Any:
    """An exponent literal that YAML left as a string (1e-4) as a float; anything else unchanged."""
    return float(v) if isinstance(v, str) and EXPONENT_NUMBER.fullmatch(v.strip()) else v


def coerce_value(field: Field, value: Any, where: str) -> Any:
    """Check `value` against the field's type (ints are accepted as floats) or raise ConfigError."""
    key = f"{field.section}.{field.name}"
    bad = ConfigError(f"{where}: {key} expects {_type_name(field)}, got {value!r}")
    if value is None and field.kind == "path":  # semseg writes `weight:` for "no weight file"
        if field.default is REQUIRED:
            raise ConfigError(f"{where}: {key} must be set ({field.doc}), got no value")
        return field.default
    if value is None:
        if field.optional:
            return None
        raise bad
    if field.kind == "float":
        value = _as_number(value)
    elif field.kind == "float_list" and isinstance(value, (list, tuple)):
        value = [_as_number(v) for v in value]
    if field.kind == "int" and _is_int(value):
        out = value
    elif field.kind == "float" and (_is_int(value) or isinstance(value, float)):
        out = float(value)
    elif field.kind == "bool" and (isinstance(value, bool) or value in (0, 1)):
        out = bool(value)  # semseg configs write `compact: 0`
    elif field.kind in ("str", "path") and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        out = str(value)
        if field.kind == "path" and out.strip().lower() == NO_FILE:  # `none`: no file
            out = NO_FILE if field.name in NO_FILE_IS_A_SETTING else field.default
    elif field.kind == "int_list" and isinstance(value, (list, tuple)) and all(map(_is_int, value)):
        out = list(value)
    elif field.kind == "float_list" and isinstance(value, (list, tuple)) and all(
            _is_int(v) or isinstance(v, float) for v in value):
        out = [float(v) for v in value]
    elif field.kind == "int_map" and isinstance(value, dict) and all(
            _is_int(k) and _is_int(v) for k, v in value.items()):
        out = dict(value)
    else:
        raise bad
    if field.choices and out not in field.choices:
        raise bad
    return out


class Config:
    """Flat, typed view of all sections: cfg.base_lr, cfg.test_h. Unknown attributes are errors."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_sources", sources)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # unpickling looks for dunder methods before _values exists
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no config key {name!r}{_suggest(name, FIELDS)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in FIELDS:
            raise AttributeError(f"no config key {name!r}{_suggest(name, FIELDS)}")
        self._values[name] = coerce_value(FIELDS[name], value, "code")
        self._sources[name] = "code"

    def __getstate__(self) -> dict:
        return {"_values": self._values, "_sources": self._sources}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "_values", state["_values"])
        object.__setattr__(self, "_sources", state["_sources"])

    def source(self, name: str) -> str:
        """Where a key's value came from: 'file line N', 'override' or 'default'."""
        return self._sources.get(name, "default")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for f in SCHEMA:
            out[f.section][f.name] = self._values[f.name]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (every key, defaults included) as YAML."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())


def _read_yaml_nodes(path: Path, asked_by: Path | None = None) -> tuple[dict[str, tuple[Any, int]], Any]:
    """Parse one file into {key: (value, line)} per section, plus its `_base_` entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        asker = f" (named by _base_ in {asked_by})" if asked_by is not None else nearest_config(path)
        raise ConfigError(f"config file {path} does not exist{asker}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if root is None:
        return {}, None
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"config file {path} must be a mapping of sections {', '.join(SECTIONS)}")
    loader = yaml.SafeLoader("")
    entries: dict[str, tuple[Any, int]] = {}
    base = None
    for key_node, value_node in root.value:
        name, line = key_node.value, key_node.start_mark.line + 1
        if name == "_base_":
            base = loader.construct_object(value_node, deep=True)
            continue
        if name not in SECTIONS:
            raise ConfigError(f"{path} line {line}: unknown section {name!r}; expected one of "
                              f"{', '.join(SECTIONS)}{_suggest(name, SECTIONS)}")
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "null", "~"):
            continue  # an empty section
        if not isinstance(value_node, yaml.MappingNode):
            raise ConfigError(f"{path} line {line}: section {name} must be a mapping of keys")
        for k_node, v_node in value_node.value:
            key, kline = k_node.value, k_node.start_mark.line + 1
            where = f"{path} line {kline}"
            if key in LEGACY_KEYS:
                logger.warning("%s: %s.%s is ignored: %s", where, name, key, LEGACY_KEYS[key])
                continue
            field = FIELDS.get(key)
            if field is None:
                section_keys = [f.name for f in SCHEMA if f.section == name]
                raise ConfigError(f"{where}: unknown key {name}.{key}{_suggest(key, section_keys or FIELDS)}")
            if field.section != name:
                raise ConfigError(f"{where}: key {key} belongs in section {field.section}, not {name}")
            entries[key] = (loader.construct_object(v_node, deep=True), kline)
    return entries, base


def _collect(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, tuple[Any, int]]]]:
    """Files in inheritance order (bases first), each with its entries."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"config inheritance loops: {' -> '.join(str(p) for p in chain + (path,))}")
    entries, base = _read_yaml_nodes(path, chain[-1] if chain else None)
    bases = [] if base is None else [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {base!r}")
    ordered = []
    for b in bases:
        ordered += _collect((path.parent / b), chain + (path,))
    return ordered + [(path, entries)]


def split_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """`KEY VALUE` pairs and `KEY=VALUE` tokens -> [(key, raw value)]."""
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        key, eq, raw = tok.partition("=")
        if eq and key and " " not in key:
            pairs.append((key, raw))
            i += 1
            continue
        if i + 1 >= len(tokens):
            raise ConfigError(f"override {tok!r} has no value; write `{tok} VALUE` or `{tok}=VALUE`")
        pairs.append((tok, tokens[i + 1]))
        i += 2
    return pairs


def _unquoted(raw: str) -> str:
    """A string override as written, unless it is a quoted YAML scalar: "''" is the empty string."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return raw


def parse_override(key: str, raw: str) -> tuple[Field, Any]:
    """Resolve `SECTION.key` (or bare `key`) and parse its value as a YAML literal."""
    section, _, name = key.rpartition(".")
    if name in LEGACY_KEYS:
        raise ConfigError(f"override {key}: no longer used; {LEGACY_KEYS[name]}")
    field = FIELDS.get(name)
    if field is None:
        raise ConfigError(f"override {key}: unknown key {name!r}{_suggest(name, FIELDS)}")
    if section and section not in (field.section, field.section.upper()):
        raise ConfigError(f"override {key}: key {name} belongs in section {field.section}")
    if field.kind == "path" and raw not in ("null", "~"):  # None too: a path's `none` means no file
        return field, _unquoted(raw)
    if field.kind == "str" and raw not in ("null", "None", "~"):
        return field, _unquoted(raw)
    if raw in ("None", "none"):  # semseg parsed Python literals
        return field, None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {key}: cannot parse {raw!r} as a YAML literal ({problem}); "
                          f"expected {_type_name(field)}") from None
    return field, value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config with its bases, apply overrides, check types and cross-key rules."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for file, entries in _collect(Path(path)):
        for key, (value, line) in entries.items():
            if value is None and FIELDS[key].kind == "path":
                continue  # not set here: the base's value or the default stays
            values[key] = coerce_value(FIELDS[key], value, f"{file} line {line}")
            sources[key] = f"{file} line {line}"
    for key, raw in split_overrides(overrides or []):
        field, value = parse_override(key, raw)
        values[field.name] = coerce_value(field, value, f"override {key}")
        sources[field.name] = "override"
    for f in SCHEMA:
        if f.name not in values:
            if f.default is REQUIRED:
                raise ConfigError(f"{path}: {f.section}.{f.name} must be set ({f.doc})")
            values[f.name] = list(f.default) if isinstance(f.default, list) else f.default
    cfg = Config(values, sources)
    validate_config(cfg)
    return cfg


def _check(ok: bool, cfg: Config, key: str, expected: str) -> None:
    if not ok:
        field = FIELDS[key]
        raise ConfigError(f"{field.section}.{key} is {getattr(cfg, key)!r} ({cfg.source(key)}); {expected}")


def nearest_crop_sides(side: int) -> list[int]:
    """The valid crop sides (8k+1, at least 9) next to `side`: [121, 129] for 128."""
    below = (side - 1) // 8 * 8 + 1
    return [s for s in (below, below + 8) if s >= 9] or [9]


def validate_config(cfg: Config) -> None:
    """Rules that involve values rather than types; each error names the key and its source."""
    _check(cfg.classes >= 2, cfg, "classes", "need at least 2 classes")
    _check(0 <= cfg.ignore_label <= 255, cfg, "ignore_label", "expected a value in 0..255 (labels are 8-bit)")
    _check(cfg.ignore_label >= cfg.classes, cfg, "ignore_label", f"it must not be a class id 0..{cfg.classes - 1}")
    for key in ("train_h", "train_w", "test_h", "test_w"):
        side = getattr(cfg, key)
        nearest = " or ".join(map(str, nearest_crop_sides(side)))
        _check(side > 8 and (side - 1) % 8 == 0, cfg, key,
               f"crop sides must be 8k+1 (e.g. 465, 473, 713); nearest: {nearest}")
    _check(0 < cfg.scale_min <= cfg.scale_max, cfg, "scale_min", f"expected 0 < scale_min <= scale_max ({cfg.scale_max})")
    _check(cfg.rotate_min <= cfg.rotate_max, cfg, "rotate_min", f"expected rotate_min <= rotate_max ({cfg.rotate_max})")
    _check(len(cfg.scales) > 0 and all(s > 0 for s in cfg.scales), cfg, "scales",
           "expected a non-empty list of positive scales, e.g. [1.0] or [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
    _check(0 < cfg.stride_rate <= 1, cfg, "stride_rate", "expected a fraction in (0, 1]")
    _check(cfg.test_batch_size >= 0, cfg, "test_batch_size", "expected 0 (auto) or a positive integer")
    for key in ("batch_size", "batch_size_val", "accum_steps", "epochs", "base_size",
                "print_freq", "save_freq", "keep_checkpoints"):
        _check(getattr(cfg, key) >= 1, cfg, key, "expected a positive integer")
    _check(cfg.base_lr > 0, cfg, "base_lr", "expected a positive learning rate")
    _check(cfg.checkpoint_minutes >= 0, cfg, "checkpoint_minutes", "expected 0 (off) or a positive number of minutes")
    _check(cfg.report_worst >= 0, cfg, "report_worst", "expected 0 or a positive number of images")
    _check(cfg.index_start >= 0 and cfg.index_step >= 0, cfg, "index_start", "index_start and index_step must be >= 0")
    _check(len(cfg.bins) > 0 and all(b >= 1 for b in cfg.bins), cfg, "bins", "expected positive bin sizes")
    _check(0 <= cfg.dropout < 1, cfg, "dropout", "expected a probability in [0, 1)")
    _check(cfg.shrink_factor >= 1, cfg, "shrink_factor", "expected an integer >= 1")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The semseg command line: --config=<yaml> and `KEY VALUE` overrides; read it with parse_config_args."""
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/toy/toy_pspnet18.yaml")
    parser.add_argument("opts", nargs="*", metavar="SECTION.key value",
                        help="overrides as `SECTION.key value` pairs or `SECTION.key=value`; the tool's options "
                             "may come before or after them")


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of a parser set up by add_config_arguments, with the tool's options anywhere
    among the overrides (`--config=c.yaml TEST.scales [1.0] --output f.onnx`). argparse would read
    a negative override value such as `-1e-3` as an option, so `KEY -value` is passed as `KEY=-value`."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    joined, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and not tokens[i].startswith("-") and NEGATIVE_VALUE.match(tokens[i + 1]):
            joined.append(f"{tokens[i]}={tokens[i + 1]}")
            i += 2
        else:
            joined.append(tokens[i])
            i += 1
    return parser.parse_intermixed_args(joined)


def describe_schema() -> str:
    """Every key with its type, default and doc: the reference shown by --help."""
    lines = []
    for section in SECTIONS:
        lines.append(f"{section}:")
        for f in SCHEMA:
            if f.section == section:
                default = "required" if f.default is REQUIRED else repr(f.default)
                lines.append(f"  {f.name} ({f.kind}, {default}): {f.doc}")
    return "\n".join(lines)
