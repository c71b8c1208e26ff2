"""TRAIN.pretrained_backbone takes any layout tool/prepare_weights.py reads, through the same
conversion: a raw timm or mit_semseg file trains exactly as the file prepare_weights converts from
it, and a file that does not fill every backbone tensor stops the run with one line, before any
checkpoint. The ImageNet files are written by the tests (see test_prepare_weights.py)."""
import re

import pytest
import torch

from conftest import assert_one_line_error, run_tool, write_config
from model.resnet import build_resnet
from test_prepare_weights import imagenet_state, write_source
from tool import prepare_weights, train
from util.config import load_config
from util.distributed import DistInfo
from util.errors import UserError

MIT_SEMSEG_BUFFERS = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")  # its SyncBN adds these


def mit_semseg_file(folder, extra: str = ""):
    """ResNet-18 as CSAIL's mit_semseg saves it: semseg's names, three SyncBN buffers per BatchNorm."""
    state = dict(imagenet_state(18))
    for key in [k for k in state if k.endswith(".running_var")]:
        layer = key.rpartition(".")[0]
        state[f"{layer}._tmp_running_mean"] = torch.zeros_like(state[key])
        state[f"{layer}._tmp_running_var"] = torch.ones_like(state[key])
        state[f"{layer}._running_iter"] = torch.ones(1)
    if extra:
        state[extra] = torch.zeros(1)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "mit_resnet18.pth")
    return folder / "mit_resnet18.pth"


def test_prepare_weights_takes_a_mit_semseg_file(tmp_path):
    """Its SyncBN buffers dropped, the tensors are those of the same weights in timm's layout."""
    outputs = {}
    for name, path in {"mit": mit_semseg_file(tmp_path / "mit"),
                       "timm": write_source(imagenet_state(18), "timm-pth", tmp_path / "timm")}.items():
        outputs[name] = tmp_path / f"{name}_v2.pth"
        prepare_weights.main(["--layers", "18", "--from-file", str(path), "--output", str(outputs[name])])
    mit, timm = (torch.load(outputs[name], weights_only=True) for name in ("mit", "timm"))
    assert mit.keys() == timm.keys() and all(torch.equal(mit[k], timm[k]) for k in mit)


def first_losses(log: str) -> str:
    return re.search(r"step \[1/1\] (main loss \S+ aux loss \S+)", log).group(1)


def test_raw_timm_and_mit_semseg_files_train_as_their_converted_file(tiny_toy, tmp_path):
    timm = write_source(imagenet_state(18), "timm-pth", tmp_path / "timm")
    mit = mit_semseg_file(tmp_path / "mit")
    converted = tmp_path / "resnet18_v2.pth"
    prepare_weights.main(["--layers", "18", "--from-file", str(timm), "--output", str(converted)])
    (tmp_path / "train4.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:4]))
    losses = {}
    for name, path in {"converted": converted, "timm": timm, "mit_semseg": mit}.items():
        cfg = write_config(tmp_path / name / "cfg.yaml", tiny_toy, DATA={"train_list": str(tmp_path / "train4.txt")},
                           TRAIN={"epochs": 1, "pretrained_backbone": str(path)})
        out = run_tool("train.py", f"--config={cfg}")
        assert out.returncode == 0, out.stderr[-3000:]
        layout = {"converted": "semseg", "timm": "timm", "mit_semseg": "mit_semseg"}[name]
        assert f"loaded 138 tensors from {path} ({layout} layout), every backbone tensor" in out.stdout
        losses[name] = first_losses(out.stdout)
    assert losses["timm"] == losses["converted"] == losses["mit_semseg"], losses


def _other_depth(tmp):
    return write_source(imagenet_state(18), "timm-pth", tmp), {"layers": 34}


def _seven_by_seven(tmp):
    torch.save(build_resnet(18, deep_stem=False).state_dict(), tmp / "tv.pth")
    return tmp / "tv.pth", {}


def _head_only(tmp):
    torch.save({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, tmp / "fc.pth")
    return tmp / "fc.pth", {}


@pytest.mark.parametrize("make, fragments", [
    (_other_depth, ["80 missing (layer1.2.conv1.weight", "it holds ResNet-18 (timm layout), not the ResNet-34 asked "
                    "for with TRAIN.layers 34"]),
    (_seven_by_seven, ["of another shape (conv1.weight (file (64, 3, 7, 7), model (64, 3, 3, 3))",
                       "it has a 7x7 stem but the model has a deep 3x3 stem; set TRAIN.deep_stem to False"]),
    (_head_only, ["a classification head only (fc.weight, fc.bias), no backbone"]),
    (lambda tmp: (mit_semseg_file(tmp, "layer2.0.bn1.stray"), {}), ["mit_semseg layout: 1 extra (layer2.0.bn1.stray)"]),
])
def test_a_file_that_does_not_fill_the_backbone_is_one_line(make, fragments, tiny_toy, tmp_path):
    """What train.py runs before any work (prepare_model), in this process."""
    path, train_settings = make(tmp_path)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"pretrained_backbone": str(path),
                                                                           **train_settings}))
    with pytest.raises(UserError) as error:
        train.prepare_model(cfg, DistInfo(0, 0, 1, torch.device("cpu"), True), train.imagenet_start(cfg))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"TRAIN.pretrained_backbone: {path}"), message
    assert all(fragment in message for fragment in fragments), message


def test_train_py_stops_on_a_wrong_backbone_before_any_checkpoint(tiny_toy, tmp_path):
    path, _ = _other_depth(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"pretrained_backbone": str(path), "layers": 34})
    out = run_tool("train.py", f"--config={cfg}")
    assert_one_line_error(out, "not the ResNet-34 asked for with TRAIN.layers 34")
    assert not list((tmp_path / "model").glob("*.pth"))


def test_a_depth_without_a_public_source_names_those_with_one(tiny_toy, tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"pretrained_backbone": "", "layers": 34}))
    with pytest.raises(UserError) as error:
        train.imagenet_start(cfg)
    assert "no public source has ImageNet weights for ResNet-34 (prepare_weights fetches ResNet-18, -50, -101, " \
           "-152)" in str(error.value)
    assert "--layers 34" not in str(error.value)  # a command that would answer `invalid choice: 34`
