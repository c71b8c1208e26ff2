"""Model structure (semseg key names and shapes), forward contract, gradients, config building, parity."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ARCHS, build_model
from model.psanet import PSANet, check_psa_mask_side, default_psa_mask_size
from model.pspnet import PSPNet
from model.resnet import resnet18, resnet50, resnet101
from util.errors import CheckpointError, ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEYS = FIXTURES / "keys"

# Key file -> constructor; the PSA files were made for a 97x97 crop (feature 13, shrunk 7).
KEY_FILE_MODELS = {
    "pspnet50_c21": lambda: PSPNet(layers=50, classes=21),
    "pspnet101_c19": lambda: PSPNet(layers=101, classes=19),
    "resnet50_deepstem_imagenet": lambda: resnet50(),
    "resnet101_deepstem_imagenet": lambda: resnet101(),
    "psanet50_c21_t0": lambda: PSANet(layers=50, classes=21, psa_type=0, mask_h=13, mask_w=13),
    "psanet50_c21_t1_compact": lambda: PSANet(layers=50, classes=21, psa_type=1, compact=True, mask_h=7, mask_w=7),
    "psanet50_c21_t2": lambda: PSANet(layers=50, classes=21, psa_type=2, mask_h=13, mask_w=13),
    "psanet50_c21_t2_compact_sf1": lambda: PSANet(layers=50, classes=21, psa_type=2, compact=True,
                                                  shrink_factor=1, mask_h=13, mask_w=13),
}


def _load_seeded_weights():
    spec = importlib.util.spec_from_file_location("seeded_weights", FIXTURES / "parity" / "seeded_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shape_text(tensor):
    return "x".join(str(d) for d in tensor.shape) or "scalar"


def _cfg(**overrides):
    base = dict(arch="psp", layers=18, classes=5, zoom_factor=8, dropout=0.1, bins=[1, 2, 3, 6], deep_stem=True,
                pretrained_backbone="", psa_type=2, compact=False, shrink_factor=2, mask_h=None, mask_w=None,
                normalization_factor=1.0, psa_softmax=True, train_h=465, train_w=465)
    base.update(overrides)
    return SimpleNamespace(**base)


def test_every_reference_key_file_has_a_model():
    assert sorted(p.stem for p in KEYS.glob("*.keys")) == sorted(KEY_FILE_MODELS)


@pytest.mark.parametrize("name", sorted(KEY_FILE_MODELS))
def test_state_dict_keys_and_shapes_match_reference(name):
    expected = [tuple(line.split()) for line in (KEYS / f"{name}.keys").read_text().splitlines()]
    with torch.device("meta"):
        model = KEY_FILE_MODELS[name]()
    assert [(key, _shape_text(value)) for key, value in model.state_dict().items()] == expected


PARITY_MODELS = {  # fixture name -> the reference's model (tests/fixtures/parity/README.md)
    "pspnet50_c21": lambda: PSPNet(layers=50, classes=21, zoom_factor=8),
    "psanet50_c21_t2": lambda: PSANet(layers=50, classes=21, zoom_factor=8, psa_type=2, compact=False,
                                      shrink_factor=2, mask_h=13, mask_w=13, normalization_factor=1.0,
                                      psa_softmax=True),
}


@pytest.mark.parametrize("name", sorted(PARITY_MODELS))
def test_parity_with_reference_logits(name):
    """The reference's logits on seeded weights and input. For PSANet (psa_type 2, not compact,
    shrink 2, 13x13 masks) this catches what the key and shape check cannot, such as swapped
    collect and distribute branches or a changed mask re-arrangement."""
    seeded = _load_seeded_weights()
    with torch.device("meta"):
        model = PARITY_MODELS[name]()
    model.to_empty(device="cpu")
    model.load_state_dict(seeded.seeded_state_dict(seeded.read_shapes(KEYS / f"{name}.keys")), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(seeded.seeded_input((1, 3, 97, 97)))
    expected = np.load(FIXTURES / "parity" / f"{name}.out.npy")
    assert logits.shape == expected.shape
    assert np.abs(logits.numpy() - expected).max() < 1e-3


def test_dilated_backbone_follows_semseg_in_every_block():
    model = PSPNet(layers=50, classes=2).layer3, PSPNet(layers=50, classes=2).layer4
    for layer, dilation in zip(model, (2, 4)):
        for block in layer:
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("zoom", [1, 2, 4, 8])
def test_eval_output_size_follows_zoom_factor_for_non_square_input(zoom):
    x = torch.randn(1, 3, 17, 25)
    expected = (int(16 / 8 * zoom + 1), int(24 / 8 * zoom + 1))
    torch.manual_seed(0)
    for model in (PSPNet(layers=18, classes=3, zoom_factor=zoom),
                  PSANet(layers=18, classes=3, zoom_factor=zoom, mask_h=3, mask_w=5)):
        model.eval()
        with torch.no_grad():
            main, aux = model(x, return_aux=True)
            plain = model(x)
        assert main.shape == aux.shape == (1, 3, *expected)
        assert torch.equal(main, plain)


@pytest.mark.parametrize("arch", ["psp", "psa"])
def test_resnet50_nets_give_full_size_logits_on_meta(arch):
    with torch.device("meta"):
        model = build_model(_cfg(arch=arch, layers=50, classes=150, train_h=465, train_w=465)).eval()
        main, aux = model(torch.empty(2, 3, 465, 465), return_aux=True)
    assert main.shape == aux.shape == (2, 150, 465, 465)


@pytest.mark.parametrize("make", [
    lambda: PSPNet(layers=18, classes=4),
    lambda: PSANet(layers=18, classes=4, psa_type=2, mask_h=3, mask_w=3),
    lambda: PSANet(layers=18, classes=4, psa_type=1, compact=True, mask_h=2, mask_w=2),
], ids=["psp18", "psa18", "psa18_compact"])
def test_every_parameter_gets_a_gradient(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(2, 3, 25, 25)
    target = torch.randint(0, 4, (2, 25, 25))
    main, aux = model(x, return_aux=True)
    (F.cross_entropy(main, target) + 0.4 * F.cross_entropy(aux, target)).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_parameter_groups_split_backbone_from_head_by_name():
    model = PSANet(layers=18, classes=4, mask_h=5, mask_w=5)
    groups = model.parameter_groups()
    names = {id(p): name for name, p in model.named_parameters()}
    backbone = {names[id(p)].split(".")[0] for p in groups["backbone"]}
    head = {names[id(p)].split(".")[0] for p in groups["head"]}
    assert backbone == {"layer0", "layer1", "layer2", "layer3", "layer4"}
    assert head == {"psa", "cls", "aux"}
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(model.parameters()))


def test_small_backbones_size_the_heads_from_their_width():
    model = PSPNet(layers=34, classes=3)
    assert model.ppm.features[0][1].weight.shape == (128, 512, 1, 1)
    assert model.cls[0].in_channels == 1024 and model.aux[0].in_channels == 256


def test_seven_by_seven_stem_option():
    with torch.device("meta"):
        net = PSPNet(layers=50, classes=3, deep_stem=False)
        classifier = resnet50(deep_stem=False)
    assert net.state_dict()["layer0.0.weight"].shape == (64, 3, 7, 7)
    assert len(net.layer0) == 4 and net.layer1[0].conv1.in_channels == 64
    classifier_state = classifier.state_dict()
    assert classifier_state["conv1.weight"].shape == (64, 3, 7, 7) and "conv2.weight" not in classifier_state


def test_classification_resnet_forward():
    assert resnet18().eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_pretrained_true_asks_for_a_path():
    with pytest.raises(CheckpointError, match="pass the path"):
        with torch.device("meta"):
            PSPNet(layers=18, pretrained=True)


@pytest.mark.parametrize("side,compact,shrink,expected", [
    (465, False, 2, 59), (465, True, 2, 30), (97, False, 2, 13), (97, True, 2, 7), (97, True, 1, 13),
    (713, False, 2, 89), (473, False, 1, 119),
])
def test_default_psa_mask_size(side, compact, shrink, expected):
    assert default_psa_mask_size(side, compact, shrink) == expected


def test_psa_mask_side_check_names_key_and_bound():
    check_psa_mask_side(59, "TRAIN.mask_h", 465, False, 2)
    for bad in (60, 61, 1):
        with pytest.raises(ConfigError, match=r"TRAIN.mask_w: expected an odd integer in \[3, 59\]"):
            check_psa_mask_side(bad, "TRAIN.mask_w", 465, False, 2)


def test_build_model_derives_psa_masks_from_the_crop():
    with torch.device("meta"):
        plain = build_model(_cfg(arch="psa", train_h=465, train_w=225))
        compact = build_model(_cfg(arch="psa", compact=True, train_h=465, train_w=225))
    assert (plain.psa.mask_h, plain.psa.mask_w) == (59, 29)
    assert (compact.psa.mask_h, compact.psa.mask_w) == (30, 15)
    assert set(ARCHS) == {"psp", "psa"}


@pytest.mark.parametrize("overrides,message", [
    (dict(arch="deeplab"), r"TRAIN.arch: unknown architecture 'deeplab'; expected one of \['psa', 'psp'\]"),
    (dict(layers=77), r"TRAIN.layers: unsupported ResNet depth 77; expected one of \[18, 34, 50, 101, 152\]"),
    (dict(arch="psa", mask_h=8, mask_w=9), r"TRAIN.mask_h: expected an odd integer in \[3, 59\]"),
    (dict(arch="psa", mask_h=9, mask_w=61), r"TRAIN.mask_w: expected an odd integer in \[3, 59\]"),
    (dict(arch="psa", mask_h=9, mask_w=None), "give both or neither"),
    (dict(arch="psa", compact=True, mask_h=29, mask_w=29), "TRAIN.mask_h: compact PSA needs the shrunk feature side"),
    (dict(arch="psa", psa_type=3), "TRAIN.psa_type"),
    (dict(zoom_factor=3), "TRAIN.zoom_factor"),
    (dict(classes=0), "DATA.classes"),
    (dict(bins=[1, 0]), "TRAIN.bins"),
])
def test_build_model_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        with torch.device("meta"):
            build_model(_cfg(**overrides))


def test_psanet_rejects_even_mask():
    with pytest.raises(ConfigError, match="TRAIN.mask_w: expected an odd integer >= 3, got 4"):
        with torch.device("meta"):
            PSANet(layers=18, mask_h=5, mask_w=4)


def test_compact_psa_on_a_mismatched_input_names_the_mask_keys():
    model = PSANet(layers=18, classes=2, compact=True, mask_h=2, mask_w=2).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 25, 25))
        with pytest.raises(ConfigError, match=r"TRAIN.mask_h x TRAIN.mask_w \(2x2\) must cover .* \(3x3\)"):
            model(torch.randn(1, 3, 33, 33))
