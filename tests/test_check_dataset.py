"""tool/check_dataset.py on a clean toy dataset, on a deliberately broken copy, and on the
custom-dataset walk-through (prepare_dataset.py folder + config/custom/custom_pspnet18.yaml)."""
import re
import shutil

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, run_tool, write_config
from tool.check_dataset import main as check
from tool.prepare_dataset import main as prepare
from util.errors import DataError
from util.toy_data import CLASS_NAMES


def histogram_rows(output: str, section: str) -> dict[str, int]:
    """{class name: pixels} of one list's histogram in the report."""
    start = re.search(rf"\n{section}: \d+ samples, \d+ readable", output).start()
    block = output[start + 1:].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:
        match = re.match(r"\s+\d+ (\S+)\s+([\d,]+)", line)
        if match:
            rows[match.group(1)] = int(match.group(2).replace(",", ""))
    return rows


def test_clean_dataset_passes_with_a_named_histogram(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy)
    out = run_tool("check_dataset.py", "--workers", "2", f"--config={cfg}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: 24 samples checked, no problems" in out.stdout
    assert "train: 16 samples, 16 readable" in out.stdout and "val: 8 samples, 8 readable" in out.stdout
    assert re.search(r"\n  train: 16/16 elapsed \d+:\d\d:\d\d ETA", out.stdout)
    train = histogram_rows(out.stdout, "train")
    assert list(train) == list(CLASS_NAMES) + ["(ignored)"]
    counts = np.zeros(256, dtype=np.int64)
    for line in (tiny_toy / "train.txt").read_text().splitlines():
        counts += np.bincount(cv2.imread(str(tiny_toy / line.split()[1]), cv2.IMREAD_UNCHANGED).ravel(),
                              minlength=256)
    assert [train[name] for name in CLASS_NAMES] + [train["(ignored)"]] == counts[[0, 1, 2, 3, 4, 5, 255]].tolist()


def test_label_map_is_applied_before_counting(tiny_toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"label_map": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}})
    assert check([f"--config={cfg}", "--split", "train", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert histogram_rows(out, "train")["ball"] == 0
    assert "warning: classes with no pixels in train: 5 (ball)" in out
    assert "note: DATA.val_list is not set" not in out and "\nval:" not in out


def test_a_crop_larger_than_every_training_image_is_a_warning(tiny_toy, tmp_path, capsys):
    """The tiny toy images are 48-64 px a side: a 57x33 crop fits some of them, 65x65 none."""
    sizes = [cv2.imread(str(tiny_toy / line.split()[0])).shape[:2]
             for line in (tiny_toy / "train.txt").read_text().splitlines()]
    largest = max(sizes, key=lambda size: size[0] * size[1])
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy)
    assert check([f"--config={cfg}", "--split", "train", "--workers", "1", "TRAIN.train_h", "57"]) == 0
    assert "warning: the training crop" not in capsys.readouterr().out
    assert check([f"--config={cfg}", "--split", "train", "--workers", "1", "TRAIN.train_h", "65",
                  "TRAIN.train_w", "65"]) == 0
    out = capsys.readouterr().out
    assert (f"warning: the training crop TRAIN.train_h x train_w 65x65 is larger than every image in train (the "
            f"largest is {largest[1]}x{largest[0]}, WxH): at scale 1 each crop is the whole image plus padding") in out


def break_toy_copy(tiny_toy, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_toy, root)
    jpeg = root / "images/train/toy_train_00000.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    color = cv2.imread(str(root / "labels/train/toy_train_00001.png"), cv2.IMREAD_COLOR)
    cv2.imwrite(str(root / "labels/train/toy_train_00001.png"), color)  # 3-channel label
    label = cv2.imread(str(root / "labels/train/toy_train_00002.png"), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 7  # classes are 0..5
    cv2.imwrite(str(root / "labels/train/toy_train_00002.png"), label)
    (root / "images/train/toy_train_00003.jpg").unlink()
    (root / "images/val/toy_val_00001.jpg").unlink()
    small = cv2.imread(str(root / "labels/val/toy_val_00002.png"), cv2.IMREAD_UNCHANGED)[:-3]
    cv2.imwrite(str(root / "labels/val/toy_val_00002.png"), small)
    (root / "bad_names.txt").write_text("one\ntwo\n")
    return root


def test_broken_dataset_fails_listing_each_problem(tiny_toy, tmp_path, capsys):
    root = break_toy_copy(tiny_toy, tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", root, TEST={"names_path": str(root / "bad_names.txt")})
    assert check([f"--config={cfg}", "--max-listed", "1", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 7 problems (6 types) in 24 samples" in out
    problems = out.split("FAILED:", 1)[1]
    expected = {
        "missing file: 2": r"image \S+toy_train_00003.jpg \(\S+train.txt line 4\): file not found",
        "unreadable file: 1": r"image \S+toy_train_00000.jpg \(\S+train.txt line 1\): cannot be decoded",
        "label not single-channel 8-bit: 1": r"label \S+toy_train_00001.png \(\S+ line 2\): has 3 channels",
        "label values out of range: 1": r"label \S+toy_train_00002.png \(\S+ line 3\): values \[7\] are outside 0..5",
        "image and label sizes differ: 1": r"\S+val.txt line 3: image \S+toy_val_00002.jpg is \d+x\d+ but label",
        "class names / colours file: 1": r"TEST.names_path \S+bad_names.txt has 2 names but DATA.classes is 6",
    }
    for heading, message in expected.items():
        assert f"\n  {heading}\n" in problems, heading
        assert re.search(message, problems), message
    assert "    ... and 1 more" in problems  # the second missing file, beyond --max-listed 1
    assert "toy_val_00001.jpg" not in problems
    assert "train: 16 samples, 12 readable" in out


def test_unusable_list_is_a_one_line_error(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"train_list": str(tmp_path / "nope.txt")})
    with pytest.raises(DataError, match=r"list file \S+nope.txt: not found"):
        check([f"--config={cfg}", "--workers", "1"])


def test_custom_walkthrough_folder_then_check_with_the_shipped_config(tiny_toy, tmp_path, capsys):
    custom = tmp_path / "dataset" / "custom"
    assert prepare(["folder", "--images", str(tiny_toy / "images"), "--labels", str(tiny_toy / "labels"),
                    "--dst", str(custom), "--val-fraction", "0.25"]) == 0
    assert len((custom / "list/train.txt").read_text().splitlines()) == 18
    assert len((custom / "list/val.txt").read_text().splitlines()) == 6
    overrides = ["DATA.data_root", str(custom), "DATA.train_list", str(custom / "list/train.txt"),
                 "DATA.val_list", str(custom / "list/val.txt")]
    config = str(REPO_ROOT / "config/custom/custom_pspnet18.yaml")
    assert check([f"--config={config}", "--workers", "1", *overrides]) == 0
    out = capsys.readouterr().out
    assert "OK: 24 samples checked, no problems" in out
    names = (REPO_ROOT / "config/custom/custom_names.txt").read_text().split()
    assert list(histogram_rows(out, "val")) == names + ["(ignored)"]
