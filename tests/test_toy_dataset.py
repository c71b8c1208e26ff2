"""The synthetic toy dataset: real-dataset format, determinism, idempotence, class design."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from util.dataset import SemSegDataset, check_files_exist, read_list_file
from util.errors import UserError
from util.toy_data import (CLASS_NAMES, GRASS, IGNORE_LABEL, WATER, generate_toy_dataset,
                           render_toy_sample)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = len(CLASS_NAMES)


def all_bytes(root: Path) -> dict:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    assert generate_toy_dataset(root, seed=0, n_train=5, n_val=3)
    return root


def test_layout_and_list_files_resolve(toy):
    for split, count in (("train", 5), ("val", 3)):
        entries = read_list_file(str(toy / f"{split}.txt"), str(toy), split)
        assert len(entries) == count
        check_files_exist(entries)
        assert all(e.image_path.startswith(f"{toy}/images/{split}/") for e in entries)
    test_entries = read_list_file(str(toy / "test.txt"), str(toy), "test")
    assert [e.image_path for e in test_entries] == \
        [e.image_path for e in read_list_file(str(toy / "val.txt"), str(toy), "val")]


def test_images_are_jpeg_and_labels_single_channel_png(toy):
    for entry in read_list_file(str(toy / "train.txt"), str(toy), "train"):
        assert Path(entry.image_path).read_bytes()[:3] == b"\xff\xd8\xff"
        assert Path(entry.label_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = cv2.imread(entry.image_path, cv2.IMREAD_UNCHANGED)
        label = cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert label.ndim == 2 and label.dtype == np.uint8
        assert image.shape[:2] == label.shape
        assert all(100 <= side <= 200 for side in label.shape)
        assert set(np.unique(label)) <= set(range(CLASSES)) | {IGNORE_LABEL}


def test_names_and_colours_match_classes(toy):
    names = (toy / "toy_names.txt").read_text().splitlines()
    assert names == list(CLASS_NAMES)
    colours = np.loadtxt(toy / "toy_colors.txt", dtype=int)
    assert colours.shape == (CLASSES, 3) and colours.min() >= 0 and colours.max() <= 255


def test_loads_through_semseg_dataset(toy):
    dataset = SemSegDataset(str(toy / "val.txt"), str(toy), "val", CLASSES, IGNORE_LABEL)
    for index in range(len(dataset)):
        image, label, _ = dataset.load_raw(index)
        assert image.shape[:2] == label.shape


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
    assert generate_toy_dataset(tmp_path / "again", seed=0, n_train=5, n_val=3)
    assert all_bytes(tmp_path / "again") == all_bytes(toy)
    assert generate_toy_dataset(tmp_path / "other", seed=1, n_train=5, n_val=3)
    other = all_bytes(tmp_path / "other")
    assert other["images/train/toy_train_00000.jpg"] != \
        (toy / "images/train/toy_train_00000.jpg").read_bytes()


def test_sample_does_not_depend_on_set_size(toy, tmp_path):
    generate_toy_dataset(tmp_path, seed=0, n_train=2, n_val=1)
    name = "images/train/toy_train_00001.jpg"
    assert (tmp_path / name).read_bytes() == (toy / name).read_bytes()


def test_idempotent_and_guarded_regeneration(tmp_path):
    assert generate_toy_dataset(tmp_path, seed=0, n_train=3, n_val=2)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert not generate_toy_dataset(tmp_path, seed=0, n_train=3, n_val=2)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    with pytest.raises(UserError, match=r"other settings .*pass -f"):
        generate_toy_dataset(tmp_path, seed=0, n_train=2, n_val=2)
    (tmp_path / "images" / "train" / "mine.jpg").write_bytes(b"user file")
    assert generate_toy_dataset(tmp_path, seed=0, n_train=2, n_val=2, force=True)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == \
        ["mine.jpg", "toy_train_00000.jpg", "toy_train_00001.jpg"]


def test_incomplete_dataset_is_regenerated(tmp_path):
    generate_toy_dataset(tmp_path, seed=0, n_train=2, n_val=1)
    (tmp_path / "labels" / "val" / "toy_val_00000.png").unlink()
    assert generate_toy_dataset(tmp_path, seed=0, n_train=2, n_val=1)
    assert (tmp_path / "labels" / "val" / "toy_val_00000.png").is_file()


def test_cli_generates_then_reports_complete(tmp_path):
    command = [sys.executable, "tool/make_toy_dataset.py", "--dst", str(tmp_path / "t"),
               "--train", "2", "--val", "1"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "wrote 2 train and 1 val samples" in first.stdout
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert second.returncode == 0 and "already complete" in second.stdout


def test_every_class_and_ignore_appear_in_fair_shares():
    counts = np.zeros(256, np.int64)
    for index in range(16):
        _, label = render_toy_sample(np.random.default_rng([7, index]), 150, 150)
        counts += np.bincount(label.ravel(), minlength=256)
    shares = counts / counts.sum()
    assert (shares[:CLASSES] > 0.02).all(), shares[:CLASSES]
    assert 0.005 < shares[IGNORE_LABEL] < 0.1


def test_grass_and_water_share_colour_but_not_texture():
    """Only texture separates them: equal mean colour, far more fine-grained grass detail."""
    checked = 0
    for index in range(12):
        image, label = render_toy_sample(np.random.default_rng([3, index]), 180, 180)
        grass, water = label == GRASS, label == WATER
        if water.sum() < 400:
            continue
        image = image.astype(np.float32)
        assert np.abs(image[grass].mean(0) - image[water].mean(0)).max() < 12
        detail = np.abs(np.diff(image.mean(2), axis=1))
        assert detail[grass[:, 1:]].mean() > 2 * detail[water[:, 1:]].mean()
        checked += 1
    assert checked >= 3
