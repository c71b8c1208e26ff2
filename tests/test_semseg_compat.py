"""semseg users' own files work unchanged: its 12 YAMLs (null values, legacy keys, data/ class files),
ImageNet initialisation from initmodel/ (and a one-line stop without it), its training checkpoints
for TRAIN.resume, and our checkpoints for its test.py. The YAMLs are written here with the keys and
values semseg publishes (../shared/reference/semseg-facts.md)."""
import importlib.util
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, assert_one_line_error, run_tool, write_config
from model import build_model, psa_mask_sides
from model.weights import imagenet_weights_path
from util.config import load_config
from util.distributed import DistInfo
from util.optim import build_optimizer, optimizer_state_from_semseg, semseg_group_modules
from util.palette import read_colors, read_names
from util.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# dataset -> (train list, val list, classes, PSPNet crop, PSANet crop, base_size, epochs)
SEMSEG_DATASETS = {
    "ade20k": ("training.txt", "validation.txt", 150, 473, 465, 512, 100),
    "voc2012": ("train_aug.txt", "val.txt", 21, 473, 465, 512, 50),
    "cityscapes": ("fine_train.txt", "fine_val.txt", 19, 713, 705, 2048, 200),
}
SEMSEG_CONFIGS = [(ds, arch, layers) for ds in SEMSEG_DATASETS for arch in ("pspnet", "psanet") for layers in (50, 101)]


def semseg_yaml(dataset: str, arch: str, layers: int) -> str:
    """One of semseg's published configs, as its files write it (keys with no value included)."""
    train_list, val_list, classes, psp_crop, psa_crop, base_size, epochs = SEMSEG_DATASETS[dataset]
    crop = psp_crop if arch == "pspnet" else psa_crop
    exp = f"exp/{dataset}/{arch}{layers}"
    psa = "" if arch == "pspnet" else """  psa_type: 2  # 0-col, 1-dis, 2-bi
  compact: 0  # compact or not
  shrink_factor: 2
  mask_h:  # mask size, default is derived from feature size
  mask_w:
  normalization_factor: 1.0
  psa_softmax: 1
"""
    return f"""DATA:
  data_root: dataset/{dataset}
  train_list: dataset/{dataset}/list/{train_list}
  val_list: dataset/{dataset}/list/{val_list}
  classes: {classes}

TRAIN:
  arch: {arch[:3]}
  layers: {layers}
  sync_bn: True  # adopt syncbn or not
  train_h: {crop}
  train_w: {crop}
  scale_min: 0.5  # minimum random scale
  scale_max: 2.0  # maximum random scale
  rotate_min: -10  # minimum random rotate
  rotate_max: 10  # maximum random rotate
  zoom_factor: 8  # zoom factor for final prediction during training, be in [1, 2, 4, 8]
  ignore_label: 255
  aux_weight: 0.4
  train_gpu: [0, 1, 2, 3, 4, 5, 6, 7]
  workers: 16  # data loader workers
  batch_size: 16  # batch size for training
  batch_size_val: 8  # batch size for validation during training
  base_lr: 0.01
  epochs: {epochs}
  start_epoch: 0
  power: 0.9
  momentum: 0.9
  weight_decay: 0.0001
  manual_seed:
  print_freq: 10
  save_freq: 1
  save_path: {exp}/model
  weight:  # path to initial weight (default: none)
  resume:  # path to latest checkpoint (default: none)
  evaluate: False  # evaluate on validation set
{psa}Distributed:
  dist_url: tcp://127.0.0.1:6789
  dist_backend: 'nccl'
  multiprocessing_distributed: True
  world_size: 1
  rank: 0
  use_apex: True
  opt_level: 'O0'
  keep_batchnorm_fp32:
  loss_scale:

TEST:
  test_list: dataset/{dataset}/list/{val_list}
  split: val  # split in [train, val and test]
  base_size: {base_size}  # based size for scaling
  test_h: {crop}
  test_w: {crop}
  scales: [1.0]  # evaluation scales, ms as [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
  has_prediction: False  # has prediction already or not
  index_start: 0  # evaluation start index in list
  index_step: 0  # evaluation step index in list, 0 means to end
  test_gpu: [0]
  model_path: {exp}/model/train_epoch_{epochs}.pth  # evaluation model path
  save_folder: {exp}/result/epoch_{epochs}/val/ss  # results save folder
  colors_path: data/{dataset}/{dataset}_colors.txt  # path of dataset colors
  names_path: data/{dataset}/{dataset}_names.txt  # path of dataset names
"""


def write_semseg_yaml(folder: Path, dataset: str, arch: str, layers: int, data_paths: dict | None = None) -> Path:
    """semseg's YAML, with `key: value` replacements of its data (and output) paths only."""
    text = semseg_yaml(dataset, arch, layers)
    for key, value in (data_paths or {}).items():
        text, count = re.subn(rf"^(  {key}:) .*$", rf"\1 {value}", text, flags=re.M)
        assert count == 1, key
    path = folder / f"{dataset}_{arch}{layers}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def toy_data_paths(toy: Path, list_file: Path, out: Path) -> dict:
    return {"data_root": toy, "train_list": list_file, "val_list": list_file, "test_list": list_file,
            "save_path": out / "model", "model_path": out / "model" / "semseg.pth", "save_folder": out / "result"}


def semseg_optimizer(model: nn.Module, base_lr: float) -> torch.optim.SGD:
    """The SGD semseg's train.py builds: one group per module, layer0..layer4 at base_lr, the rest at 10x."""
    modules = semseg_group_modules(model)
    groups = [{"params": getattr(model, name).parameters(), "lr": base_lr * (1 if name.startswith("layer") else 10)}
              for name in modules]
    return torch.optim.SGD(groups, lr=base_lr, momentum=0.9, weight_decay=1e-4)


def as_old_torch_state(state: dict) -> dict:
    """An optimizer state_dict as the torch of semseg's days wrote it (no foreach/maximize/... keys)."""
    old_keys = ("params", "lr", "momentum", "dampening", "weight_decay", "nesterov")
    return {"state": state["state"], "param_groups": [{k: g[k] for k in old_keys} for g in state["param_groups"]]}


@pytest.mark.parametrize("dataset,arch,layers", SEMSEG_CONFIGS, ids=lambda v: str(v))
def test_every_semseg_yaml_loads_as_published(tmp_path, caplog, dataset, arch, layers):
    caplog.set_level(logging.INFO)
    cfg = load_config(write_semseg_yaml(tmp_path, dataset, arch, layers))
    classes = SEMSEG_DATASETS[dataset][2]
    assert (cfg.weight, cfg.resume, cfg.pretrained_backbone, cfg.manual_seed) == ("", "", "", None)
    assert imagenet_weights_path(cfg.pretrained_backbone, cfg.layers) == REPO_ROOT / f"initmodel/resnet{layers}_v2.pth"
    assert (cfg.arch, cfg.layers, cfg.classes, cfg.dist_backend, cfg.train_gpu) == (arch[:3], layers, classes, "nccl",
                                                                                    list(range(8)))
    for legacy in ("use_apex", "opt_level", "keep_batchnorm_fp32", "loss_scale", "test_gpu"):
        assert sum(f".{legacy} is ignored" in r.getMessage() for r in caplog.records) == 1, legacy
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.classes == classes
    if arch == "psanet":
        assert (cfg.mask_h, cfg.mask_w, cfg.compact, cfg.psa_softmax) == (None, None, False, True)
        side = {465: 59, 705: 89}[cfg.train_h]
        assert psa_mask_sides(cfg) == {"mask_h": side, "mask_w": side}
    caplog.clear()
    assert len(read_names(cfg.names_path, classes)) == classes and read_colors(cfg.colors_path, classes).shape == (classes, 3)
    used = [r.getMessage() for r in caplog.records if "where semseg keeps it" in r.getMessage()]
    assert len(used) == 2 and f"config/{dataset}/{dataset}_names.txt" in used[0]


def test_semseg_class_files_of_every_dataset_resolve():
    """semseg's data/ folder also holds CamVid and BDD class files; the project ships them all."""
    for names in (REPO_ROOT / "config").glob("*/*_names.txt"):
        dataset = names.parent.name
        if dataset == "custom":
            continue
        count = len(read_names(f"data/{dataset}/{dataset}_names.txt", len(names.read_text().splitlines())))
        assert read_colors(f"data/{dataset}/{dataset}_colors.txt", count).shape == (count, 3)
    assert {p.parent.name for p in (REPO_ROOT / "config").glob("*/*_colors.txt")} >= {
        "ade20k", "voc2012", "cityscapes", "camvid", "bdddrivable", "bddsemseg"}


def test_a_class_file_the_user_has_in_data_wins_over_the_shipped_copy(tmp_path, monkeypatch, caplog):
    """semseg's data/voc2012/voc2012_names.txt, relative to the working folder: the user's own file
    is read as it is; the copy in config/voc2012/ is only the fallback when it does not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "voc2012").mkdir(parents=True)
    mine = [f"my class {i}" for i in range(21)]
    (tmp_path / "data" / "voc2012" / "voc2012_names.txt").write_text("\n".join(mine) + "\n")
    (tmp_path / "data" / "voc2012" / "voc2012_colors.txt").write_text("1 2 3\n" * 21)
    caplog.set_level(logging.INFO)
    assert read_names("data/voc2012/voc2012_names.txt", 21) == mine
    assert read_colors("./data/voc2012/voc2012_colors.txt", 21).tolist() == [[1, 2, 3]] * 21
    assert "where semseg keeps it" not in caplog.text


@pytest.mark.slow
def test_test_py_runs_a_semseg_yaml_with_only_data_paths_changed(tiny_toy, tmp_path):
    """voc2012_pspnet50 as published (ResNet-50, window 473, base_size 512) on one toy image, with a
    semseg-format checkpoint: `module.` keys, saved with epoch and optimizer."""
    one = tmp_path / "one.txt"
    one.write_text((tiny_toy / "val.txt").read_text().splitlines()[0] + "\n")
    config = write_semseg_yaml(tmp_path, "voc2012", "pspnet", 50, toy_data_paths(tiny_toy, one, tmp_path / "exp"))
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg)
    Path(cfg.model_path).parent.mkdir(parents=True)
    torch.save({"epoch": 50, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": as_old_torch_state(semseg_optimizer(model, 0.01).state_dict())}, cfg.model_path)
    out = run_tool("test.py", f"--config={config}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "where semseg keeps it" in out.stdout and "config/voc2012/voc2012_colors.txt" in out.stdout
    metrics = json.loads((tmp_path / "exp" / "result" / "metrics.json").read_text())
    assert metrics["images"] == 1 and 0 <= metrics["allAcc"] <= 1
    name = Path(one.read_text().split()[0]).stem
    assert (tmp_path / "exp/result/gray" / f"{name}.png").is_file()
    assert (tmp_path / "exp/result/color" / f"{name}.png").is_file()


def test_training_without_initmodel_stops_before_any_work_with_one_line(tiny_toy, tmp_path):
    if (REPO_ROOT / "initmodel/resnet50_v2.pth").exists():
        pytest.skip("this checkout has initmodel/resnet50_v2.pth")
    lists = tiny_toy / "train.txt"
    config = write_semseg_yaml(tmp_path, "ade20k", "pspnet", 50, toy_data_paths(tiny_toy, lists, tmp_path / "exp"))
    out = without_legacy_notices(run_tool("train.py", f"--config={config}"))
    line = assert_one_line_error(out, "TRAIN.pretrained_backbone is not set", "semseg's ImageNet weights",
                                 "deep-stem ResNet-50", f"{REPO_ROOT / 'initmodel/resnet50_v2.pth'} not found",
                                 "python tool/prepare_weights.py --layers 50 fetches it")
    assert line.endswith("set TRAIN.pretrained_backbone none to train from random weights")
    assert not (tmp_path / "exp").exists()  # no folder, log or checkpoint was made
    given = run_tool("train.py", f"--config={config}", "TRAIN.pretrained_backbone", str(tmp_path / "r50.pth"))
    assert_one_line_error(without_legacy_notices(given),
                          f"TRAIN.pretrained_backbone (override): ImageNet weights {tmp_path / 'r50.pth'} not found")


def without_legacy_notices(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run's output less the five one-line notices of semseg's keys that have no use here."""
    lines = out.stderr.splitlines(True)
    notices = [line for line in lines if " is ignored: " in line]
    assert len(notices) == 5, out.stderr
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout, "".join(l for l in lines if l not in notices))


def _copy_of_the_code(root: Path) -> Path:
    """The repository's code in another folder, as a fresh checkout, so that its initmodel/ is ours to write."""
    for part in ("tool", "util", "model", "lib", "config"):
        shutil.copytree(REPO_ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _seeded_weights():
    spec = importlib.util.spec_from_file_location("seeded_weights", FIXTURES / "parity" / "seeded_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_training_starts_from_semseg_initmodel_file(tiny_toy, tmp_path):
    """initmodel/resnet50_v2.pth (semseg's deep-stem keys, fc included) in the checkout is read by
    default; with a learning rate too small to move them, the trained convs are the file's."""
    code = _copy_of_the_code(tmp_path / "checkout")
    seeded = _seeded_weights()
    imagenet = seeded.seeded_state_dict(seeded.read_shapes(FIXTURES / "keys/resnet50_deepstem_imagenet.keys"))
    (code / "initmodel").mkdir()
    torch.save(imagenet, code / "initmodel/resnet50_v2.pth")
    two = tmp_path / "two.txt"
    two.write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:2]))
    config = write_semseg_yaml(tmp_path, "ade20k", "pspnet", 50, toy_data_paths(tiny_toy, two, tmp_path / "exp"))
    out = run_tool(str(code / "tool/train.py"), f"--config={config}", "DATA.classes", "6", "TRAIN.train_h", "33",
                   "TRAIN.train_w", "33", "TRAIN.batch_size", "2", "TRAIN.epochs", "1", "TRAIN.workers", "0",
                   "TRAIN.base_lr", "1e-9", "TRAIN.manual_seed", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"TRAIN.pretrained_backbone: loaded \d+ tensors from {re.escape(str(code))}/initmodel/resnet50_v2.pth",
                     out.stdout)
    state = torch.load(tmp_path / "exp/model/train_epoch_1.pth", weights_only=True)["state_dict"]
    for ours, theirs in (("layer0.0.weight", "conv1.weight"), ("layer0.6.weight", "conv3.weight"),
                         ("layer4.2.conv2.weight", "layer4.2.conv2.weight")):
        torch.testing.assert_close(state[f"module.{ours}"], imagenet[theirs], atol=1e-6, rtol=0)


def test_semseg_optimizer_state_keeps_every_parameters_momentum(tiny_toy, tmp_path):
    """Momentum built by semseg's own 8-group SGD lands on the same parameters in our 2 groups."""
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_toy, TRAIN={"arch": "psa", "train_h": 33, "train_w": 33}))
    torch.manual_seed(0)
    model = build_model(cfg)
    theirs = semseg_optimizer(model, 0.01)
    for _ in range(2):
        main, aux = model(torch.randn(2, 3, 33, 33), return_aux=True)
        (main.square().mean() + aux.square().mean()).backward()
        theirs.step()
    ours = build_optimizer(model, 0.01, 0.9, 1e-4)
    ours.load_state_dict(optimizer_state_from_semseg(as_old_torch_state(theirs.state_dict()), model, "semseg.pth"))
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours.state[param]["momentum_buffer"], theirs.state[param]["momentum_buffer"],
                                   atol=0, rtol=0, msg=name)
    lrs = {group["name"]: group["lr"] for group in ours.param_groups}
    assert lrs == {"backbone": 0.01, "head": 0.1}
    psp = build_model(load_config(write_config(tmp_path / "p.yaml", tiny_toy)))
    with pytest.raises(CheckpointError, match="the optimizer group of ppm in semseg.pth holds 17 parameters"):
        optimizer_state_from_semseg(semseg_optimizer(model, 0.01).state_dict(), psp, "semseg.pth")


def _semseg_checkpoint_from(ours_path: Path, cfg, out: Path) -> None:
    """Our checkpoint as semseg's train.py would have saved the same state: its 8-group SGD (built as
    semseg builds it) with our momentum buffers put on the same parameters; no RNG, scaler or best mIoU."""
    ckpt = torch.load(ours_path, weights_only=True)
    model = build_model(cfg)
    model.load_state_dict({k[len("module."):]: v for k, v in ckpt["state_dict"].items()})
    ours = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    ours.load_state_dict(ckpt["optimizer"])
    theirs = semseg_optimizer(model, ours.param_groups[0]["lr"])
    for param in model.parameters():
        theirs.state[param]["momentum_buffer"] = ours.state[param]["momentum_buffer"].clone()
    torch.save({"epoch": ckpt["epoch"], "state_dict": ckpt["state_dict"],
                "optimizer": as_old_torch_state(theirs.state_dict())}, out)


@pytest.mark.slow
def test_resuming_a_semseg_checkpoint_continues_as_the_original_run(tiny_toy, tmp_path):
    """2 epochs straight = 1 epoch, converted to semseg's checkpoint format, resumed for the second
    (dropout 0, so the RNG that semseg did not save plays no part): the same weights to the bit."""
    cfg_path = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, TRAIN={"print_freq": 4})
    out = run_tool("train.py", f"--config={cfg_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRAIN.pretrained_backbone none: the backbone starts from random weights" in out.stdout + out.stderr
    straight = torch.load(tmp_path / "run/model/train_epoch_2.pth", weights_only=True)
    cfg = load_config(cfg_path)
    _semseg_checkpoint_from(tmp_path / "run/model/train_epoch_1.pth", cfg, tmp_path / "semseg_epoch_1.pth")
    out = run_tool("train.py", f"--config={cfg_path}", "TRAIN.resume", str(tmp_path / "semseg_epoch_1.pth"),
                   "TRAIN.save_path", str(tmp_path / "resumed"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a semseg training checkpoint (epoch 1 done)" in out.stdout and "start fresh" in out.stdout
    assert "random weights" not in out.stdout + out.stderr  # resuming needs no ImageNet weights
    resumed = torch.load(tmp_path / "resumed/train_epoch_2.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key

    # semseg's test.py: DataParallel model, load_state_dict(checkpoint['state_dict'], strict=False)
    model = nn.DataParallel(build_model(cfg))
    result = model.load_state_dict(torch.load(tmp_path / "resumed/train_epoch_2.pth")["state_dict"], strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def test_validation_scores_upsampled_logits_at_zoom_below_8():
    """zoom_factor 1: logits at 1/8 are resized to the label (bilinear, align_corners) before the
    argmax, as semseg's validation does, so every label pixel is scored."""
    from tool.train import validate

    class LowResolution(nn.Module):
        def forward(self, x):  # class 1 wins left of the middle, class 0 right of it
            ramp = torch.linspace(1, -1, 3).expand(x.shape[0], 3, 3)
            return torch.stack([-ramp, ramp], dim=1)

    label = torch.zeros(1, 17, 17, dtype=torch.long)
    label[:, :, :8] = 1
    cfg = SimpleNamespace(classes=2, ignore_label=255, channels_last=False, amp="off")
    info = DistInfo(0, 0, 1, torch.device("cpu"), True)
    scores = validate(LowResolution(), [(torch.zeros(1, 3, 17, 17), label)], cfg, info)
    assert scores.target.sum() == 17 * 17  # every pixel scored, not the 3x3 subsample
    assert scores.intersection.tolist() == [17 * 9, 17 * 8]  # all right; the middle column ties -> class 0
