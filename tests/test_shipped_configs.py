"""Every shipped config loads, validates and builds its model (on the meta device, so no memory
or time is spent on weights), carries the reference's headline settings, points at the list
files tool/prepare_dataset.py writes and at names/colours files with one line per class."""
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from model import build_model, psa_mask_sides
from model.weights import imagenet_weights_path
from tool.prepare_dataset import CONFIG_LISTS
from util.config import load_config
from util.label_maps import CITYSCAPES_TRAIN_IDS

CONFIG_DIR = REPO_ROOT / "config"


def shipped_files(folder: Path, pattern: str) -> list[Path]:
    """Files under `folder` matching `pattern` that git tracks, so that a user's own half-written
    config does not fail the suite; every match outside a git checkout (an unpacked release)."""
    found = sorted(folder.rglob(pattern))
    try:
        listed = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "--", "."], capture_output=True,
                                check=True)
    except (OSError, subprocess.CalledProcessError):
        return found
    tracked = {(folder / name).resolve() for name in listed.stdout.decode().split("\0") if name}
    return [path for path in found if path.resolve() in tracked]


SHIPPED = shipped_files(CONFIG_DIR, "*.yaml")
LEAVES = [p for p in SHIPPED if not any(part.startswith("_") for part in p.relative_to(CONFIG_DIR).parts)]
BASES = [p for p in SHIPPED if p.parent.name == "_base_"]

# dataset -> (classes, base_size, epochs, PSPNet crop, PSANet crop)
HEADLINE = {"ade20k": (150, 512, 100, 473, 465), "voc2012": (21, 512, 50, 473, 465),
            "cityscapes": (19, 2048, 200, 713, 705)}
REFERENCE_LEAVES = [CONFIG_DIR / ds / f"{ds}_{arch}{layers}.yaml"
                    for ds in HEADLINE for arch in ("pspnet", "psanet") for layers in (50, 101)]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_only_configs_git_tracks_are_tested(tmp_path):
    """A user's untracked, half-written YAML in config/ is not the repository's to test."""
    repo = tmp_path / "repo"
    (repo / "config" / "mine").mkdir(parents=True)
    (repo / "config" / "mine" / "shipped.yaml").write_text("DATA:\n  classes: 2\n")
    (repo / "config" / "mine" / "half_written.yaml").write_text("DATA:\n  classes: [\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "config/mine/shipped.yaml"], check=True)
    assert shipped_files(repo / "config", "*.yaml") == [repo / "config" / "mine" / "shipped.yaml"]
    unpacked = tmp_path / "unpacked" / "config"  # not a git checkout: every file
    unpacked.mkdir(parents=True)
    (unpacked / "a.yaml").write_text("DATA:\n  classes: 2\n")
    assert shipped_files(unpacked, "*.yaml") == [unpacked / "a.yaml"]


def test_the_twelve_reference_configs_and_the_custom_example_are_shipped():
    assert set(REFERENCE_LEAVES + [CONFIG_DIR / "custom/custom_pspnet18.yaml"]) <= set(LEAVES)


@pytest.mark.parametrize("path", LEAVES, ids=relative)
def test_leaf_loads_and_builds_its_model_on_the_meta_device(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.classes == cfg.classes and model.layers == cfg.layers
    for key in ("names_path", "colors_path"):
        listed = getattr(cfg, key)
        if listed.startswith("config/"):  # shipped with the code (the toy's are generated)
            lines = (REPO_ROOT / listed).read_text(encoding="utf-8").splitlines()
            assert len(lines) == cfg.classes and all(line.strip() for line in lines), listed
            assert "\r" not in (REPO_ROOT / listed).read_text(encoding="utf-8")
    colors = (REPO_ROOT / cfg.colors_path).read_text().split() if cfg.colors_path.startswith("config/") else []
    assert all(0 <= int(value) <= 255 for value in colors)


@pytest.mark.parametrize("path", REFERENCE_LEAVES, ids=relative)
def test_reference_leaf_has_the_headline_settings(path):
    dataset, arch, layers = re.fullmatch(r"(\w+?)_(pspnet|psanet)(\d+)", path.stem).groups()
    classes, base_size, epochs, psp_crop, psa_crop = HEADLINE[dataset]
    cfg = load_config(path)
    crop = psp_crop if arch == "pspnet" else psa_crop
    exp = f"exp/{dataset}/{arch}{layers}"
    assert (cfg.arch, cfg.layers, cfg.classes, cfg.base_size, cfg.epochs) == \
        (arch[:3], int(layers), classes, base_size, epochs)
    assert (cfg.train_h, cfg.train_w, cfg.test_h, cfg.test_w) == (crop,) * 4
    assert (cfg.batch_size, cfg.base_lr, cfg.power, cfg.momentum, cfg.weight_decay) == (16, 0.01, 0.9, 0.9, 1e-4)
    assert (cfg.aux_weight, cfg.scale_min, cfg.scale_max, cfg.rotate_min, cfg.rotate_max) == (0.4, 0.5, 2.0, -10, 10)
    assert (cfg.zoom_factor, cfg.ignore_label, cfg.sync_bn) == (8, 255, True)
    assert cfg.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.split == "val"
    assert cfg.pretrained_backbone == "" and cfg.weight == "" and cfg.resume == ""  # semseg's ImageNet default:
    assert imagenet_weights_path(cfg.pretrained_backbone, cfg.layers) == REPO_ROOT / f"initmodel/resnet{layers}_v2.pth"
    assert cfg.save_path == f"{exp}/model"
    assert cfg.model_path == f"{exp}/model/train_epoch_{epochs}.pth"
    assert cfg.save_folder == f"{exp}/result/epoch_{epochs}/val/ms"
    train_list, val_list = CONFIG_LISTS[dataset]
    assert cfg.data_root == f"dataset/{dataset}"
    lists = f"dataset/{dataset}/list"
    assert (cfg.train_list, cfg.val_list, cfg.test_list) == (
        f"{lists}/{train_list}", f"{lists}/{val_list}", f"{lists}/{val_list}")
    assert (cfg.names_path, cfg.colors_path) == (f"config/{dataset}/{dataset}_names.txt",
                                                 f"config/{dataset}/{dataset}_colors.txt")
    assert not cfg.reduce_zero_label and cfg.label_map is None  # prepare_dataset converts the labels
    if arch == "psanet":
        assert (cfg.psa_type, cfg.compact, cfg.shrink_factor, cfg.normalization_factor, cfg.psa_softmax) == \
            (2, False, 2, 1.0, True)
        side = {465: 59, 705: 89}[crop]  # the reference's derived mask sizes
        assert psa_mask_sides(cfg) == {"mask_h": side, "mask_w": side}


def test_custom_example_uses_the_folder_subcommand_lists():
    cfg = load_config(CONFIG_DIR / "custom/custom_pspnet18.yaml")
    train_list, val_list = CONFIG_LISTS["folder"]
    assert (cfg.data_root, cfg.train_list, cfg.val_list) == (
        "dataset/custom", f"dataset/custom/list/{train_list}", f"dataset/custom/list/{val_list}")


def test_cityscapes_labelids_mixin_maps_raw_ids_with_the_official_table(tmp_path):
    leaf = tmp_path / "raw.yaml"
    leaf.write_text(yaml.safe_dump({"_base_": [str(CONFIG_DIR / "cityscapes/cityscapes_pspnet50.yaml"),
                                               str(CONFIG_DIR / "_base_/cityscapes_labelids.yaml")]}))
    cfg = load_config(leaf)
    assert cfg.label_map == CITYSCAPES_TRAIN_IDS and cfg.classes == 19 and cfg.train_h == 713


def _key_lines(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r"\s+(\w+):", line)
        if match:
            yield number, match.group(1), line


def test_every_setting_is_commented_where_it_first_appears():
    in_bases = set()
    for base in BASES:
        for number, key, line in _key_lines(base):
            assert "#" in line, f"{relative(base)} line {number}: {key} has no comment"
            in_bases.add(key)
    for leaf in LEAVES:
        if leaf.parent.name == "toy":
            continue  # the quick start's standalone config
        for number, key, line in _key_lines(leaf):
            assert key in in_bases or "#" in line, f"{relative(leaf)} line {number}: {key} has no comment"
