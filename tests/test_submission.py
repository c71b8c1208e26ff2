"""TEST.submission_format: server formats checked against the official tools where there are some
(the PyPI package cityscapesscripts: its label table and its pixel-level evaluation)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cityscapes_eval
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

from conftest import REPO_ROOT, assert_one_line_error, run_tool, write_config
from model import build_model
from tool.prepare_dataset import main as prepare
from util.config import load_config
from util.errors import ConfigError
from util.label_maps import voc_palette
from util.submission import check_submission_format, encode


def test_encodings_follow_the_official_tables():
    train_ids = np.arange(19, dtype=np.uint8)
    assert encode(train_ids, "cityscapes").tolist() == [trainId2label[t].id for t in range(19)]
    assert encode(np.array([0, 149], np.uint8), "ade20k").tolist() == [1, 150]
    check_submission_format("voc", 21)
    with pytest.raises(ConfigError, match="TEST.submission_format cityscapes needs DATA.classes 19"):
        check_submission_format("cityscapes", 6)


def test_voc_test_split_writes_palette_pngs_without_labels(tiny_toy, tmp_path):
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"classes": 21})
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(load_config(cfg_path)).state_dict()}, tmp_path / "model.pth")
    images = [line.split()[0] for line in (tiny_toy / "val.txt").read_text().splitlines()][:2]
    (tmp_path / "test.txt").write_text("".join(f"{i}\n" for i in images))
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"classes": 21},
                            TEST={"model_path": str(tmp_path / "model.pth"), "test_list": str(tmp_path / "test.txt"),
                                  "split": "test", "scales": [1.0], "names_path": "", "colors_path": "",
                                  "submission_format": "voc"})
    out = run_tool("test.py", f"--config={cfg_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = tmp_path / "result"
    assert not (result / "metrics.json").exists() and not (result / "report.html").exists()
    for image in images:
        name = Path(image).stem
        png = Image.open(result / "submission" / f"{name}.png")
        assert png.mode == "P"
        assert np.array(png.getpalette(), np.uint8).reshape(-1, 3)[:256].tolist() == voc_palette().tolist()
        assert (np.array(png) == cv2.imread(str(result / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)).all()

    out = run_tool("test.py", f"--config={cfg_path}", "TEST.submission_format", "ade20k")
    assert_one_line_error(out, "TEST.submission_format ade20k needs DATA.classes 150", "is 21")


def cityscapes_layout(tiny_toy: Path, root: Path) -> list[str]:
    """A miniature official download from the toy images: gtFine labelIds through the official
    trainId -> labelId table, with ignored ids (0 unlabeled, 4 static, 9 parking) in a stripe."""
    frames = {"train": ["aachen_000000_000019"],
              "val": ["frankfurt_000000_000294", "frankfurt_000001_000538", "lindau_000002_000019"]}
    to_label_id = np.zeros(256, np.uint8)
    for train_id in range(19):
        to_label_id[train_id] = trainId2label[train_id].id
    for split, prefixes in frames.items():
        for k, prefix in enumerate(prefixes):
            city = prefix.split("_")[0]
            image = cv2.imread(str(tiny_toy / "images" / "val" / f"toy_val_{k:05d}.jpg"))
            label = to_label_id[cv2.imread(str(tiny_toy / "labels" / "val" / f"toy_val_{k:05d}.png"),
                                           cv2.IMREAD_UNCHANGED)]
            label[:, :6] = np.array([0, 4, 9])[np.arange(label.shape[0]) % 3][:, None]
            for path, pixels in ((root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", image),
                                 (root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png", label)):
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), pixels)
    return frames["val"]


def test_cityscapes_submission_scored_by_cityscapesscripts_gives_our_miou(tiny_toy, tmp_path, monkeypatch):
    raw, data = tmp_path / "raw", tmp_path / "cityscapes"
    frames = cityscapes_layout(tiny_toy, raw)
    assert prepare(["cityscapes", "--src", str(raw), "--dst", str(data)]) in (0, None)
    # Predictions: the truth with a quarter of the pixels (ignored ones included) set to random trainIds.
    rng = np.random.default_rng(0)
    gray = tmp_path / "result" / "gray"
    gray.mkdir(parents=True)
    for prefix in frames:
        truth = cv2.imread(str(next(data.glob(f"gtFine/val/*/{prefix}_gtFine_labelTrainIds.png"))), cv2.IMREAD_UNCHANGED)
        pred = np.where(truth == 255, 0, truth).astype(np.uint8)
        noisy = rng.random(pred.shape) < 0.25
        pred[noisy] = rng.integers(0, 19, int(noisy.sum()))
        assert cv2.imwrite(str(gray / f"{prefix}_leftImg8bit.png"), pred)
    cfg_path = write_config(tmp_path / "cfg.yaml", data, DATA={"classes": 19},
                            TEST={"test_list": str(data / "list" / "fine_val.txt"), "has_prediction": True,
                                  "names_path": str(REPO_ROOT / "config/cityscapes/cityscapes_names.txt"),
                                  "colors_path": str(REPO_ROOT / "config/cityscapes/cityscapes_colors.txt"),
                                  "submission_format": "cityscapes"})
    out = run_tool("test.py", f"--config={cfg_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    ours = json.loads((tmp_path / "result" / "metrics.json").read_text())

    # The official evaluator, finding each prediction under CITYSCAPES_RESULTS by its own file pattern.
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "result" / "submission"))
    args = cityscapes_eval.args
    monkeypatch.setattr(args, "predictionPath", None)
    monkeypatch.setattr(args, "predictionWalk", None)
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    truths = sorted(str(p) for p in raw.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = [cityscapes_eval.getPrediction(args, t) for t in truths]
    official = cityscapes_eval.evaluateImgLists(predictions, truths, args)["classScores"]
    for cls in ours["classes"]:
        expected = official[trainId2label[cls["id"]].name]
        assert (cls["iou"] is None) == np.isnan(expected), cls
        if cls["iou"] is not None:
            assert cls["iou"] == pytest.approx(expected, abs=1e-12), cls
    assert ours["mIoU"] == pytest.approx(cityscapes_eval.getScoreAverage(official, args), abs=1e-12)
    ious = [c["iou"] for c in ours["classes"]]
    assert max(ious) > 0.5 and min(ious) < 0.1  # some classes right, some wrong: a comparison that can fail
