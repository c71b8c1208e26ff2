"""tool/test.py end to end on the tiny toy data: outputs, 2 processes == 1, re-scoring saved PNGs."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
import torch

from conftest import run_tool, write_config
from util.config import load_config

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def evaluate(tiny_toy, folder, checkpoint, *extra, launcher=None):
    cfg = write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(checkpoint), "scales": [0.75, 1.0],
                                                          "vis_count": 2})
    out = run_tool("test.py", f"--config={cfg}", *extra, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.loads((folder / "result" / "metrics.json").read_text())


def test_writes_predictions_table_and_json(tiny_toy, tmp_path, checkpoint):
    out, metrics = evaluate(tiny_toy, tmp_path, checkpoint)
    result = tmp_path / "result"
    names = [line.split()[0].split("/")[-1][:-4] for line in (tiny_toy / "val.txt").read_text().splitlines()]
    for name in names:
        gray = cv2.imread(str(result / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(tiny_toy / "images" / "val" / f"{name}.jpg"))
        assert gray.shape == image.shape[:2] and gray.max() < 6
        assert (result / "color" / f"{name}.png").is_file()
    assert len(list((result / "vis").glob("*.png"))) == 8  # labelled split: the report's worst (20 >= 8)
    assert metrics["images"] == 8 and len(metrics["classes"]) == 6
    assert {"mIoU", "mAcc", "allAcc"} <= metrics.keys()
    assert "mIoU" in out.stdout and "sky" in out.stdout and "ETA" in out.stdout


@pytest.mark.parametrize("workers, processes, cores, expected", [(-1, 1, 2, 2), (-1, 1, 16, 4), (-1, 2, 2, 1),
                                                                  (0, 1, 8, 0), (6, 2, 8, 3), (16, 1, 8, 8)])
def test_evaluation_loader_follows_the_training_worker_rule(tiny_toy, tmp_path, monkeypatch, workers, processes,
                                                            cores, expected):
    """TRAIN.workers per node split across the node's processes, -1 = min(4, cores per process), at
    most one per image (8 here): never more than PyTorch suggests, so no DataLoader warning."""
    from tool.test import ScaledImages, make_loader
    from util.dataset import dataset_from_config
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"workers": workers}))
    images = ScaledImages(dataset_from_config(cfg, cfg.test_list, "val"), list(range(8)), [64])
    assert make_loader(cfg, SimpleNamespace(device=torch.device("cpu"), is_main=True), images).num_workers == expected


@pytest.mark.slow
def test_two_processes_give_the_same_numbers(tiny_toy, tmp_path, checkpoint):
    _, one = evaluate(tiny_toy, tmp_path / "one", checkpoint)
    _, two = evaluate(tiny_toy, tmp_path / "two", checkpoint, launcher=TORCHRUN_2)
    assert one["classes"] == two["classes"] and one["mIoU"] == two["mIoU"]
    gray_one = sorted(p.name for p in (tmp_path / "one" / "result" / "gray").iterdir())
    assert gray_one == sorted(p.name for p in (tmp_path / "two" / "result" / "gray").iterdir())
    # The report: rank 0 gathers every process's per-image scores, so its files are the same too.
    assert {k: v for k, v in one.items() if k != "config"} == {k: v for k, v in two.items() if k != "config"}
    results = [tmp_path / run / "result" for run in ("one", "two")]
    pages = [(r / "report.html").read_text().replace(str(r.parent), "RUN") for r in results]
    assert pages[0] == pages[1] and "RUN/cfg.yaml" in pages[0]
    for name in ["per_image.csv", "confusion.png"] + [f"vis/{p.name}" for p in (results[0] / "vis").iterdir()]:
        assert (results[0] / name).read_bytes() == (results[1] / name).read_bytes(), name
    assert len(list((results[1] / "vis").iterdir())) == 8


def test_has_prediction_rescores_saved_pngs(tiny_toy, tmp_path, checkpoint):
    _, first = evaluate(tiny_toy, tmp_path, checkpoint)
    cfg = tmp_path / "cfg.yaml"
    out = run_tool("test.py", f"--config={cfg}", "TEST.has_prediction", "True", "TEST.model_path", "")
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert again["classes"] == first["classes"]
    assert again["model_path"] is None and again["network"].startswith("predictions saved in")
    next((tmp_path / "result" / "gray").glob("*.png")).unlink()
    out = run_tool("test.py", f"--config={cfg}", "TEST.has_prediction", "True")
    assert out.returncode == 2 and "does not exist" in out.stderr and "has_prediction" in out.stderr


def test_index_slice_and_same_base_names(tiny_toy, tmp_path, checkpoint):
    """Two images called x.jpg in different folders get separate predictions (a/x.png, b/x.png)."""
    root = tmp_path / "data"
    for sub, sample in (("a", "toy_val_00000"), ("b", "toy_val_00001"), ("c", "toy_val_00002")):
        (root / sub).mkdir(parents=True)
        (root / sub / "x.jpg").write_bytes((tiny_toy / "images" / "val" / f"{sample}.jpg").read_bytes())
        (root / sub / "x.png").write_bytes((tiny_toy / "labels" / "val" / f"{sample}.png").read_bytes())
    (root / "list.txt").write_text("".join(f"{s}/x.jpg {s}/x.png\n" for s in "abc"))
    cfg = write_config(tmp_path / "cfg.yaml", root, TEST={"model_path": str(checkpoint), "names_path": "",
                                                         "colors_path": "", "test_list": str(root / "list.txt")})
    out = run_tool("test.py", f"--config={cfg}", "TEST.index_start", "0", "TEST.index_step", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    gray = tmp_path / "result" / "gray"
    assert sorted(str(p.relative_to(gray)) for p in gray.rglob("*.png")) == ["a/x.png", "b/x.png"]


def test_demo_writes_gray_color_and_overlay(tiny_toy, tmp_path, checkpoint):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TEST={"model_path": str(checkpoint), "scales": [1.0]})
    image = tiny_toy / "images" / "val" / "toy_val_00003.jpg"
    out = run_tool("demo.py", f"--config={cfg}", f"--image={image}", "--output", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.endswith(".png")]  # log lines share stdout
    assert [Path(p).name for p in printed] == [f"toy_val_00003_{s}.png" for s in ("gray", "color", "overlay")]
    h, w = cv2.imread(str(image)).shape[:2]
    assert cv2.imread(printed[0], cv2.IMREAD_UNCHANGED).shape == (h, w)
    assert cv2.imread(printed[2]).shape == (h, w, 3)
    out = run_tool("demo.py", f"--config={cfg}", f"--image={tmp_path / 'nothing.jpg'}")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_demo_on_a_folder_predicts_what_test_py_predicts(tiny_toy, tmp_path, checkpoint):
    import shutil
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TEST={"model_path": str(checkpoint), "scales": [1.0]})
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["toy_val_00001", "toy_val_00004"]
    for name in names:
        shutil.copy(tiny_toy / "images" / "val" / f"{name}.jpg", folder)
    out = run_tool("demo.py", f"--config={cfg}", f"--image={folder}", "--output", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.png")) == sorted(
        f"{n}_{s}.png" for n in names for s in ("gray", "color", "overlay"))
    out = run_tool("test.py", f"--config={cfg}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in names:
        demo = cv2.imread(str(tmp_path / "demo" / f"{name}_gray.png"), cv2.IMREAD_UNCHANGED)
        test = cv2.imread(str(tmp_path / "result" / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert demo.shape == test.shape and (demo == test).all(), name
