"""tool/publish_model.py, then loading by URL (TEST.model_path https://...): the published file is
weights only under its hash, its card reports the experiment's scores, and the network loaded
from a local http.server gives the same predictions as the checkpoint it came from."""
import hashlib
import json
import re

import pytest
import torch

from conftest import assert_one_line_error, closed_port_url, run_tool, serve_folder, write_config
from model import build_model
from model.weights import load_model_weights
from tool import publish_model
from util.checkpoint import with_module_prefix
from util.config import load_config
from util.errors import CheckpointError, UserError
from util.predictor import Predictor


@pytest.fixture
def experiment(tiny_toy, tmp_path):
    """A trained-looking toy experiment: exp/toy/run/model/train_epoch_2.pth and its val metrics.json."""
    config = write_config(tmp_path / "toy.yaml", tiny_toy)
    cfg = load_config(config)
    torch.manual_seed(0)
    network = build_model(cfg)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.1)
    model_dir = tmp_path / "exp" / "toy" / "run" / "model"
    model_dir.mkdir(parents=True)
    checkpoint = model_dir / "train_epoch_2.pth"
    torch.save({"epoch": 2, "state_dict": with_module_prefix(network.state_dict()), "config": cfg.to_dict(),
                "optimizer": {"state": {}, "param_groups": []}}, checkpoint)
    scores = model_dir.parent / "result" / "epoch_2" / "val" / "ss" / "metrics.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"config": str(config), "images": 8, "scales": [1.0], "flip": True,
                                  "mIoU": 0.4321, "mAcc": 0.5432, "allAcc": 0.8765}))
    return config, checkpoint


def test_publish_then_load_by_url_gives_the_same_predictions(experiment, tmp_path, monkeypatch):
    config, checkpoint = experiment
    release = tmp_path / "release"
    publish_model.main([str(checkpoint), "--output", str(release)])
    (published,) = release.glob("*.pth")
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    assert re.fullmatch(r"toy_pspnet18-[0-9a-f]{8}\.pth", published.name) and published.stem.endswith(digest[:8])
    saved = torch.load(published, weights_only=True)
    assert list(saved) == ["state_dict"] and all(key.startswith("module.") for key in saved["state_dict"])
    card = published.with_suffix(".md").read_text()
    for fragment in (digest, "PSPNet", "| classes | 6 |", "33 x 33", "2 of 2", "0.4321 | 0.5432 | 0.8765",
                     f"python tool/test.py --config={config} TEST.model_path {published.name}", "base_lr: 0.01"):
        assert fragment in card, fragment

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(2))
    local = Predictor.from_config(config, ["TEST.model_path", str(checkpoint)], device="cpu")
    with serve_folder(release) as base:
        remote = Predictor.from_config(config, ["TEST.model_path", f"{base}/{published.name}"], device="cpu")
    assert (tmp_path / "torch" / "hub" / "checkpoints" / published.name).is_file()
    fine_tune = build_model(load_config(config))  # TRAIN.weight by URL: the same file, from the cache now
    load_model_weights(fine_tune, f"http://127.0.0.1:9/{published.name}", "TRAIN.weight")
    assert all(torch.equal(a, b) for a, b in zip(fine_tune.state_dict().values(), local.network.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(local.network(x), remote.network(x))


def test_url_with_tampered_body_is_one_line_and_removed_from_the_cache(experiment, tmp_path, monkeypatch):
    config, checkpoint = experiment
    release = tmp_path / "release"
    publish_model.main([str(checkpoint), "--output", str(release)])
    (published,) = release.glob("*.pth")
    published.write_bytes(published.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with serve_folder(release) as base, pytest.raises(CheckpointError, match="TEST.model_path: .*refused and deleted"):
        Predictor.from_config(config, ["TEST.model_path", f"{base}/{published.name}"], device="cpu")
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("name,fragment", [("model.pth", "carries no hash in its file name"),
                                           ("model-0123abcd.pth", "cannot download")])
def test_url_without_hash_or_offline_is_one_line(experiment, tmp_path, name, fragment):
    config, _ = experiment
    url = closed_port_url(name)
    out = run_tool("test.py", f"--config={config}", "TEST.model_path", url, env={"TORCH_HOME": str(tmp_path / "t")})
    assert_one_line_error(out, "TEST.model_path", url, fragment)


def test_publish_mistakes_are_one_line(experiment, tmp_path):
    config, checkpoint = experiment
    semseg_style = tmp_path / "semseg.pth"
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({key: saved[key] for key in ("epoch", "state_dict", "optimizer")}, semseg_style)
    out = run_tool("publish_model.py", str(semseg_style), "--output", str(tmp_path / "r"))
    assert_one_line_error(out, "holds no training config", "--config")
    out = run_tool("publish_model.py", str(semseg_style), "--output", str(tmp_path / "r"), "--config", str(config),
                   "TRAIN.layers", "50")
    assert out.returncode == 2  # argparse: overrides are not taken
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(config.read_text().replace("classes: 6", "classes: 5"))
    out = run_tool("publish_model.py", str(semseg_style), "--output", str(tmp_path / "r"), "--config", str(wrong))
    assert_one_line_error(out, "6 classes", "DATA.classes is 5")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_an_imagenet_backbone_file_is_not_a_segmentation_checkpoint(tmp_path):
    from model.resnet import build_resnet
    backbone = tmp_path / "resnet18-imagenet.pth"
    torch.save(build_resnet(18, deep_stem=False).state_dict(), backbone)
    with pytest.raises(UserError, match="is not a segmentation checkpoint: it holds ImageNet backbone weights.*"
                                        "tool/train.py"):
        publish_model.main([str(backbone), "--output", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_missing_one_tensor_is_refused(experiment, tmp_path):
    """The card would describe a network the file cannot rebuild: loading is strict."""
    _, checkpoint = experiment
    saved = torch.load(checkpoint, weights_only=True)
    del saved["state_dict"]["module.aux.4.bias"]
    partial = tmp_path / "partial.pth"
    torch.save(saved, partial)
    with pytest.raises(CheckpointError, match="aux.4.bias"):
        publish_model.main([str(partial), "--output", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
