"""Weight files: every accepted format round-trips; every mistake is one CheckpointError that says why."""
import argparse
import logging
import os

import cv2
import numpy as np
import pytest
import torch

from model.pspnet import PSPNet
from model.resnet import resnet18, resnet50
from model.imagenet_convert import load_backbone_weights
from model.weights import load_checkpoint, load_model_weights, load_state_dict_file
from util.errors import CheckpointError

DEEP_STEM_PAIRS = [("conv1", "layer0.0"), ("bn1", "layer0.1"), ("conv2", "layer0.3"),
                   ("bn2", "layer0.4"), ("conv3", "layer0.6"), ("bn3", "layer0.7")]


class WritesMarker:
    """Unpickling this runs a command; a weights-only load must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _randomised(state):
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def _assert_same(actual, expected):
    assert actual.shape == expected.shape and torch.equal(actual, expected)


def test_deep_stem_imagenet_state_dict_initialises_the_backbone(tmp_path):
    imagenet = _randomised(resnet18().state_dict())
    path = tmp_path / "resnet18_v2.pth"
    torch.save(imagenet, path)
    model = PSPNet(layers=18, classes=3)
    head_before = model.cls[4].weight.clone()

    report = load_backbone_weights(model, path, "TRAIN.pretrained_backbone")

    state = model.state_dict()
    for old, new in DEEP_STEM_PAIRS:
        _assert_same(state[f"{new}.weight"], imagenet[f"{old}.weight"])
    _assert_same(state["layer0.7.running_var"], imagenet["bn3.running_var"])
    _assert_same(state["layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"])
    _assert_same(model.cls[4].weight, head_before)
    assert report.clean() and not any(k.startswith("fc.") for k in report.loaded)


def test_torchvision_seven_by_seven_state_dict(tmp_path):
    imagenet = _randomised(resnet18(deep_stem=False).state_dict())
    path = tmp_path / "resnet18_tv.pth"
    torch.save(imagenet, path)
    model = PSPNet(layers=18, classes=3, deep_stem=False, pretrained=str(path))
    state = model.state_dict()
    _assert_same(state["layer0.0.weight"], imagenet["conv1.weight"])
    _assert_same(state["layer0.1.bias"], imagenet["bn1.bias"])
    _assert_same(state["layer3.0.downsample.0.weight"], imagenet["layer3.0.downsample.0.weight"])


def test_classification_resnet_loads_its_own_format(tmp_path):
    imagenet = _randomised(resnet18().state_dict())
    torch.save(imagenet, tmp_path / "r18.pth")
    model = resnet18()
    load_backbone_weights(model, tmp_path / "r18.pth", "MODEL.weights")
    _assert_same(model.state_dict()["conv3.weight"], imagenet["conv3.weight"])


@pytest.mark.parametrize("prefix", ["", "module."])
def test_full_checkpoint_round_trip(tmp_path, prefix):
    source = PSPNet(layers=18, classes=3)
    source.load_state_dict(_randomised(source.state_dict()))
    checkpoint = {"epoch": 4, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
                  "state_dict": {prefix + k: v for k, v in source.state_dict().items()}}
    path = tmp_path / "train_epoch_4.pth"
    torch.save(checkpoint, path)

    target = PSPNet(layers=18, classes=3)
    report = load_model_weights(target, path, "TEST.model_path", strict=True)

    assert report.clean()
    for key, value in source.state_dict().items():
        _assert_same(target.state_dict()[key], value)
    assert set(load_state_dict_file(path, "TEST.model_path")) == set(source.state_dict())


def test_different_class_count_is_named(tmp_path):
    path = tmp_path / "voc.pth"
    torch.save({"state_dict": PSPNet(layers=18, classes=21).state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        load_model_weights(PSPNet(layers=18, classes=150), path, "TRAIN.weight", strict=False)
    assert str(error.value) == f"checkpoint {path} has 21 classes (cls.4.weight 21x512x1x1) but DATA.classes is 150"


def test_missing_file_names_path_and_key(tmp_path):
    path = tmp_path / "nowhere" / "train_epoch_50.pth"
    with pytest.raises(CheckpointError, match=rf"TEST.model_path: weight file not found: {path}"):
        load_model_weights(PSPNet(layers=18, classes=3), path, "TEST.model_path")


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_model_weights(PSPNet(layers=18, classes=3), path, "TRAIN.weight")
    message = str(error.value)
    assert message.startswith(f"TRAIN.weight: {path} contains arbitrary Python objects")
    assert "refused" in message and "TRAIN.trust_pickle True" in message
    assert not marker.exists()


def test_trusted_legacy_pickle_loads_only_with_explicit_opt_in(tmp_path):
    state = _randomised(resnet18().state_dict())
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(arch="psp")}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_state_dict_file(path, "TRAIN.weight")
    _assert_same(load_state_dict_file(path, "TRAIN.weight", trust_pickle=True)["fc.bias"], state["fc.bias"])


def _jpeg_bytes():
    return cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


NOT_CHECKPOINTS = {  # what a user may point TEST.model_path at by mistake -> how the message describes it
    "text": (lambda: b"epoch 3\nmodel: train_epoch_3.pth\n", "it is a text file"),
    "random bytes": (lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
                     "unrecognised binary content"),
    "jpeg": (_jpeg_bytes, "it is a JPEG image"),
    "empty": (lambda: b"", "it is empty"),
}


@pytest.mark.parametrize("case", NOT_CHECKPOINTS)
def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path, case):
    content, described = NOT_CHECKPOINTS[case]
    path = tmp_path / "model.pth"
    path.write_bytes(content())
    with pytest.raises(CheckpointError) as error:
        load_model_weights(PSPNet(layers=18, classes=3), path, "TEST.model_path")
    assert str(error.value) == (f"TEST.model_path: {path} is not a PyTorch checkpoint ({described}); expected a "
                                f"file written by torch.save, such as train_epoch_<n>.pth")


def test_a_folder_as_checkpoint_is_named_a_folder_with_its_newest_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=rf"TEST.model_path: {tmp_path} is a folder; expected a checkpoint "
                                              rf"file, e.g. {tmp_path}/train_epoch_<n>.pth"):
        load_checkpoint(tmp_path, "TEST.model_path")
    for epoch in (2, 10):
        torch.save({"epoch": epoch}, tmp_path / f"train_epoch_{epoch}.pth")
    newest = tmp_path / "train_epoch_10.pth"
    with pytest.raises(CheckpointError, match=rf"is a folder; expected a checkpoint file, e.g. {newest}$"):
        load_checkpoint(tmp_path, "TEST.model_path")


def _saved_model(path):
    source = PSPNet(layers=18, classes=3)
    torch.save({"epoch": 1, "state_dict": _randomised(source.state_dict())}, path)
    return path


def test_bit_damage_inside_a_checkpoint_names_the_file(tmp_path):
    """4 KB zeroed in the middle (tensor data, which torch.load reads without complaint) and a file
    cut short: both are refused, naming the file."""
    path = _saved_model(tmp_path / "train_epoch_1.pth")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(data)
    assert torch.load(damaged, weights_only=True)["epoch"] == 1  # what happened before the check
    with pytest.raises(CheckpointError, match=rf"TRAIN.resume: {damaged} is damaged: its record \S+ does not match "
                                              r"the checksum written when it was saved"):
        load_checkpoint(damaged, "TRAIN.resume")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:middle])
    with pytest.raises(CheckpointError, match=rf"TEST.model_path: {cut} is damaged or truncated"):
        load_checkpoint(cut, "TEST.model_path")
    data = bytearray(path.read_bytes())  # a damaged directory entry: an unknown compression method
    data[data.index(b"PK\x01\x02") + 10] = 99
    method = tmp_path / "method.pth"
    method.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"TEST.model_path: {method} is damaged or truncated"):
        load_checkpoint(method, "TEST.model_path")


def test_checkpoints_without_checksums_still_load(tmp_path):
    """torch's pre-1.6 format (semseg's era) has no CRC-32s, nor has a zip saved with them switched off."""
    source = PSPNet(layers=18, classes=3)
    state = {"epoch": 2, "state_dict": _randomised(source.state_dict())}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy, "TEST.model_path")["epoch"] == 2
    if hasattr(torch.serialization, "set_crc32_options"):  # torch >= 2.5
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(state, tmp_path / "no_crc.pth")
        finally:
            torch.serialization.set_crc32_options(True)
        assert load_checkpoint(tmp_path / "no_crc.pth", "TEST.model_path")["epoch"] == 2


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    listing = tmp_path / "list.pth"
    torch.save({"epoch": 3, "best": 0.5}, listing)
    with pytest.raises(CheckpointError, match=r"holds no state dict .* found \['best', 'epoch'\]"):
        load_state_dict_file(listing, "TRAIN.weight")


def backbone_error(path, model=None) -> str:
    """The one line a backbone file that does not fit stops with."""
    with pytest.raises(CheckpointError) as error:
        load_backbone_weights(model or PSPNet(layers=18, classes=3), path, "TRAIN.pretrained_backbone")
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_partial_backbone_is_an_error_naming_missing_keys_and_counts(tmp_path):
    stem_and_layer1 = {k: v for k, v in resnet18().state_dict().items()
                       if not k.startswith(("layer2", "layer3", "layer4"))}
    path = tmp_path / "stem_only.pth"
    torch.save(stem_and_layer1, path)
    message = backbone_error(path)
    assert message.startswith(f"TRAIN.pretrained_backbone: {path} does not fit the backbone after conversion from "
                              f"the semseg layout: 75 missing (layer2.0.conv1.weight, ")
    assert "likely cause: it holds a ResNet of no standard depth" in message


def test_backbone_of_another_depth_is_an_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), path)
    message = backbone_error(path)
    assert "extra (layer1.0.conv3.weight, " in message
    assert "layer1.0.conv1.weight (file (64, 128, 1, 1), model (64, 128, 3, 3))" in message
    assert message.endswith("likely cause: it holds ResNet-50 (semseg layout), not the ResNet-18 asked for with "
                            "TRAIN.layers 18")


def test_stem_kind_mismatch_points_at_deep_stem(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(resnet18(deep_stem=False).state_dict(), path)
    assert "likely cause: it has a 7x7 stem but the model has a deep 3x3 stem; set TRAIN.deep_stem to False" in \
        backbone_error(path)


def test_a_few_missing_or_extra_backbone_keys_stop_the_run(tmp_path):
    """Every backbone tensor comes from the file: two missing BN vectors are as fatal as a missing layer."""
    imagenet = resnet18().state_dict()
    del imagenet["layer4.1.bn2.weight"], imagenet["layer4.1.bn2.bias"]
    imagenet["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(imagenet, path)
    message = backbone_error(path)
    assert "2 missing (layer4.1.bn2.weight, layer4.1.bn2.bias); 1 extra (layer5.0.conv1.weight)" in message


def test_strict_full_load_reports_missing_keys_and_lenient_load_warns(tmp_path, caplog):
    state = PSPNet(layers=18, classes=3).state_dict()
    del state["aux.4.bias"]
    path = tmp_path / "no_aux_bias.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*missing from the file \(1\): aux.4.bias"):
        load_model_weights(PSPNet(layers=18, classes=3), path, "TRAIN.weight", strict=True)
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        report = load_model_weights(PSPNet(layers=18, classes=3), path, "TEST.model_path", strict=False)
    assert report.missing == ["aux.4.bias"]
    assert any("aux.4.bias" in r.getMessage() for r in caplog.records)
