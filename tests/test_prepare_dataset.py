"""tool/prepare_dataset.py on miniature copies of the official ADE20K, Cityscapes and VOC2012 + SBD
downloads: list files, every converted label value, links, idempotence and layout errors."""
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from conftest import REPO_ROOT, run_tool
from tool.prepare_dataset import main as prepare
from util.errors import DataError, UserError

# The official cityscapesScripts labelId -> trainId table, written out here independently.
OFFICIAL_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                       24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
VOC_BORDER_RGB = (224, 224, 192)


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


def write_gray(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label.astype(np.uint8))


def write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """An 8-bit palette PNG (colour type 3) like VOC's SegmentationClass, without PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = indices.shape
    rows = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
                     + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def read(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert label is not None and label.ndim == 2 and label.dtype == np.uint8, path
    return label


def snapshot(root: Path) -> dict:
    """Every entry under root without following links: link targets, file bytes and times."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_file():
                state[key] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


# ---- ADE20K --------------------------------------------------------------------------------

ADE_RAW = {  # split -> {stem: raw annotation}; 0 = "other" (ignored), 1..150 = classes
    "training": {"ADE_train_00000001": np.array([[0, 1, 2], [150, 75, 0]]),
                 "ADE_train_00000002": np.array([[3, 3, 3], [149, 0, 1]])},
    "validation": {"ADE_val_00000001": np.array([[1, 150, 0], [0, 10, 100]])},
}


@pytest.fixture
def ade_raw(tmp_path) -> Path:
    root = tmp_path / "downloads" / "ADEChallengeData2016"
    for split, samples in ADE_RAW.items():
        for seed, (stem, label) in enumerate(samples.items()):
            write_image(root / "images" / split / f"{stem}.jpg", *label.shape, seed=seed)
            write_gray(root / "annotations" / split / f"{stem}.png", label)
    return root


@pytest.mark.parametrize("src_level", ["parent", "itself"])
def test_ade20k_lists_links_and_every_converted_value(ade_raw, tmp_path, src_level, capsys):
    src = ade_raw.parent if src_level == "parent" else ade_raw
    dst = tmp_path / "dataset" / "ade20k"
    assert prepare(["ade20k", "--src", str(src), "--dst", str(dst), "--workers", "1"]) == 0
    assert (dst / "list" / "training.txt").read_text() == (
        "images/training/ADE_train_00000001.jpg annotations/training/ADE_train_00000001.png\n"
        "images/training/ADE_train_00000002.jpg annotations/training/ADE_train_00000002.png\n")
    assert (dst / "list" / "validation.txt").read_text() == \
        "images/validation/ADE_val_00000001.jpg annotations/validation/ADE_val_00000001.png\n"
    for split in ("training", "validation"):
        link = dst / "images" / split
        assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
        assert link.resolve() == (ade_raw / "images" / split).resolve()
    expected = {("training", "ADE_train_00000001"): [[255, 0, 1], [149, 74, 255]],
                ("training", "ADE_train_00000002"): [[2, 2, 2], [148, 255, 0]],
                ("validation", "ADE_val_00000001"): [[0, 149, 255], [255, 9, 99]]}
    for (split, stem), values in expected.items():
        np.testing.assert_array_equal(read(dst / "annotations" / split / f"{stem}.png"), values)
    assert "3 written" in capsys.readouterr().out


def test_ade20k_second_run_changes_nothing(ade_raw, tmp_path, capsys):
    dst = tmp_path / "ade"
    args = ["ade20k", "--src", str(ade_raw), "--dst", str(dst), "--workers", "1"]
    prepare(args)
    before = snapshot(dst)
    capsys.readouterr()
    prepare(args)
    out = capsys.readouterr().out
    assert snapshot(dst) == before
    assert "0 written, 3 already up to date" in out and "2 kept" in out
    assert "list/training.txt: 2 samples (unchanged)" in out


def test_ade20k_refuses_a_wrong_layout_saying_what_it_expected(tmp_path):
    src = tmp_path / "download"
    (src / "images").mkdir(parents=True)
    (src / "readme.txt").write_text("x")
    with pytest.raises(UserError) as err:
        prepare(["ade20k", "--src", str(src), "--dst", str(tmp_path / "out")])
    message = str(err.value)
    assert f"not the official ADE20K layout: expected ADEChallengeData2016/images/training under {src}" in message
    assert f"found in {src}: images/, readme.txt" in message
    (src / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)
    (src / "ADEChallengeData2016" / "images" / "validation").mkdir()
    with pytest.raises(UserError, match="expected ADEChallengeData2016/annotations/training under"):
        prepare(["ade20k", "--src", str(src), "--dst", str(tmp_path / "out")])
    with pytest.raises(UserError, match="does not exist"):
        prepare(["ade20k", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "out")])


def test_ade20k_bad_or_missing_annotations_are_named(ade_raw, tmp_path):
    write_gray(ade_raw / "annotations/training/ADE_train_00000002.png", np.array([[200, 1]]))
    dst = tmp_path / "ade"
    with pytest.raises(DataError, match=r"1 files could not be converted.*ADE_train_00000002.png: "
                                        r"values \[200\] are outside 0..150"):
        prepare(["ade20k", "--src", str(ade_raw), "--dst", str(dst), "--workers", "1"])
    assert (dst / "annotations/training/ADE_train_00000001.png").is_file()  # the others are done
    (ade_raw / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(DataError, match="1 ADE20K validation annotations are missing: .*ADE_val_00000001.png"):
        prepare(["ade20k", "--src", str(ade_raw), "--dst", str(dst)])


def test_ade20k_refuses_to_convert_in_place(ade_raw):
    with pytest.raises(UserError, match="would overwrite the raw ones"):
        prepare(["ade20k", "--src", str(ade_raw), "--dst", str(ade_raw)])


# ---- Cityscapes ----------------------------------------------------------------------------

ALL_LABEL_IDS = np.array(list(range(34)) + [255]).reshape(5, 7)  # 0..33, and 255 that no official PNG holds


@pytest.fixture
def cityscapes_raw(tmp_path) -> Path:
    root = tmp_path / "cityscapes"
    samples = {"train": ["aachen_000000_000019", "bochum_000000_000313"],
               "val": ["frankfurt_000000_000294"], "test": ["berlin_000000_000019"]}
    for split, prefixes in samples.items():
        for seed, prefix in enumerate(prefixes):
            city = prefix.split("_")[0]
            write_image(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", 5, 7, seed)
            if split != "test":
                gt = root / "gtFine" / split / city
                write_gray(gt / f"{prefix}_gtFine_labelIds.png", np.roll(ALL_LABEL_IDS, seed))
                write_gray(gt / f"{prefix}_gtFine_instanceIds.png", np.zeros((5, 7)))  # not a label
    return root


def test_cityscapes_lists_relative_links_and_every_train_id(cityscapes_raw, tmp_path):
    dst = tmp_path / "dataset" / "cityscapes"
    prepare(["cityscapes", "--src", str(cityscapes_raw), "--dst", str(dst), "--link", "relative",
             "--workers", "2"])
    assert (dst / "list/fine_train.txt").read_text().splitlines() == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
        "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
        "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"]
    assert (dst / "list/fine_val.txt").read_text() == (
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png "
        "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png\n")
    assert (dst / "list/fine_test.txt").read_text() == \
        "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png\n"
    for split in ("train", "val", "test"):
        link = dst / "leftImg8bit" / split
        assert not Path(os.readlink(link)).is_absolute()
        assert link.resolve() == (cityscapes_raw / "leftImg8bit" / split).resolve()
    for line in (dst / "list/fine_train.txt").read_text().splitlines():
        raw = read(cityscapes_raw / line.split()[1].replace("labelTrainIds", "labelIds"))
        converted = read(dst / line.split()[1])
        for label_id, train_id in zip(raw.ravel(), converted.ravel()):
            assert train_id == OFFICIAL_CITYSCAPES.get(int(label_id), 255), (label_id, train_id)
        assert sorted(set(converted.ravel())) == list(range(19)) + [255]


def test_cityscapes_missing_label_and_wrong_layout(cityscapes_raw, tmp_path):
    (cityscapes_raw / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="1 Cityscapes val labelIds files are missing: .*frankfurt_000000_000294"):
        prepare(["cityscapes", "--src", str(cityscapes_raw), "--dst", str(tmp_path / "out")])
    gt = cityscapes_raw / "gtFine"
    expected = f"expected leftImg8bit/train under {gt}; found in {gt}: train/, val/"
    with pytest.raises(UserError, match=re.escape(expected)):
        prepare(["cityscapes", "--src", str(cityscapes_raw / "gtFine"), "--dst", str(tmp_path / "out")])


# ---- VOC2012 + SBD -------------------------------------------------------------------------

def voc_reference_palette() -> np.ndarray:
    """256 palette entries: the 21 class colours of the shipped colours file, the border at 255."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:21] = np.loadtxt(REPO_ROOT / "config/voc2012/voc2012_colors.txt", dtype=np.uint8)
    palette[255] = VOC_BORDER_RGB
    return palette


VOC_LABELS = {"2007_000001": np.array([[0, 1, 255], [20, 15, 0]]),   # VOC train
              "2007_000002": np.array([[2, 2, 255], [0, 0, 0]]),     # VOC train, also in SBD
              "2007_000003": np.array([[7, 255, 7], [0, 3, 0]])}     # VOC val, also in SBD
SBD_LABELS = {"2007_000002": np.array([[9, 9, 9], [9, 9, 9]]),       # VOC's own label must win
              "2007_000003": np.array([[4, 4, 4], [4, 4, 4]]),       # held out: VOC val
              "2008_000004": np.array([[0, 5, 5], [20, 0, 1]]),      # SBD train only
              "2008_000005": np.array([[11, 0, 0], [0, 0, 12]])}     # SBD val only


@pytest.fixture
def voc_raw(tmp_path) -> Path:
    """A download folder holding VOCdevkit/VOC2012 and benchmark_RELEASE side by side."""
    download = tmp_path / "voc_download"
    voc = download / "VOCdevkit" / "VOC2012"
    palette = voc_reference_palette()
    for seed, name in enumerate(sorted(VOC_LABELS.keys() | SBD_LABELS.keys())):
        write_image(voc / "JPEGImages" / f"{name}.jpg", 2, 3, seed)
    for name, label in VOC_LABELS.items():
        write_palette_png(voc / "SegmentationClass" / f"{name}.png", label, palette)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2007_000003\r\n")
    sbd = download / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for name, label in SBD_LABELS.items():
        scipy.io.savemat(sbd / "cls" / f"{name}.mat",
                         {"GTcls": {"Segmentation": label.astype(np.uint8), "CategoriesPresent": [1]}})
    (sbd / "train.txt").write_text("2007_000002\n2007_000003\n2008_000004\n")
    (sbd / "val.txt").write_text("2008_000005\n")
    return download


def voc_line(name: str) -> str:
    return f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png"


def test_palette_png_fixture_is_what_opencv_expands_to_colours(voc_raw):
    png = voc_raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"
    assert png.read_bytes()[25] == 3  # IHDR colour type: palette
    bgr = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (2, 3, 3) and tuple(bgr[0, 2][::-1]) == VOC_BORDER_RGB


def test_voc2012_train_aug_lists_and_every_decoded_value(voc_raw, tmp_path, capsys):
    dst = tmp_path / "dataset" / "voc2012"
    prepare(["voc2012", "--src", str(voc_raw), "--dst", str(dst), "--workers", "1"])
    lists = dst / "list"
    assert (lists / "train.txt").read_text().splitlines() == [voc_line("2007_000001"), voc_line("2007_000002")]
    assert (lists / "val.txt").read_text().splitlines() == [voc_line("2007_000003")]
    # (SBD train + SBD val + VOC train) minus VOC val
    assert (lists / "train_aug.txt").read_text().splitlines() == [
        voc_line(n) for n in ("2007_000001", "2007_000002", "2008_000004", "2008_000005")]
    out = dst / "SegmentationClassAug"
    for name, label in VOC_LABELS.items():  # palette indices, border 255 kept as ignore
        np.testing.assert_array_equal(read(out / f"{name}.png"), label)
    for name in ("2008_000004", "2008_000005"):
        np.testing.assert_array_equal(read(out / f"{name}.png"), SBD_LABELS[name])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in VOC_LABELS.keys() | {
        "2008_000004", "2008_000005"})
    assert (dst / "JPEGImages").resolve() == (voc_raw / "VOCdevkit/VOC2012/JPEGImages").resolve()
    assert "note" not in capsys.readouterr().out


def test_voc2012_copy_mode_with_explicit_sbd_is_idempotent(voc_raw, tmp_path, capsys):
    voc_only = tmp_path / "elsewhere"
    (voc_raw / "benchmark_RELEASE").rename(tmp_path / "benchmark_RELEASE")
    (voc_raw / "VOCdevkit").rename(voc_only)
    dst = tmp_path / "voc"
    args = ["voc2012", "--src", str(voc_only / "VOC2012"), "--sbd", str(tmp_path / "benchmark_RELEASE"),
            "--dst", str(dst), "--link", "copy", "--workers", "1"]
    prepare(args)
    assert not (dst / "JPEGImages").is_symlink()
    assert sorted(p.name for p in (dst / "JPEGImages").iterdir()) == sorted(
        p.name for p in (voc_only / "VOC2012/JPEGImages").iterdir())
    assert len((dst / "list/train_aug.txt").read_text().splitlines()) == 4
    before = snapshot(dst)
    capsys.readouterr()
    prepare(args)
    assert snapshot(dst) == before
    assert "0 written, 10 already up to date" in capsys.readouterr().out  # 5 labels + 5 copies


def test_voc2012_without_sbd_writes_train_and_val_and_says_so(voc_raw, tmp_path, capsys):
    beside = tmp_path / "voc_beside"  # --src VOCdevkit finds benchmark_RELEASE next to it
    prepare(["voc2012", "--src", str(voc_raw / "VOCdevkit"), "--dst", str(beside), "--workers", "1"])
    assert sorted(p.name for p in (beside / "list").iterdir()) == ["train.txt", "train_aug.txt", "val.txt"]
    capsys.readouterr()
    shutil.rmtree(voc_raw / "benchmark_RELEASE")
    dst = tmp_path / "voc"
    prepare(["voc2012", "--src", str(voc_raw / "VOCdevkit"), "--dst", str(dst), "--workers", "1"])
    assert sorted(p.name for p in (dst / "list").iterdir()) == ["train.txt", "val.txt"]
    assert "list/train_aug.txt, which the voc2012 configs train on, was not written" in capsys.readouterr().out


def test_voc2012_unknown_colour_and_missing_sbd_file_are_named(voc_raw, tmp_path):
    label = voc_raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"
    assert cv2.imwrite(str(label), np.full((2, 3, 3), (3, 2, 1), dtype=np.uint8))  # BGR of RGB (1, 2, 3)
    unknown = r"2007_000001.png: colours \[\(1, 2, 3\)\] \(RGB\) are not in the VOC palette"
    with pytest.raises(DataError, match=unknown):
        prepare(["voc2012", "--src", str(voc_raw), "--dst", str(tmp_path / "voc"), "--workers", "1"])
    (voc_raw / "benchmark_RELEASE/dataset/cls/2008_000005.mat").unlink()
    with pytest.raises(DataError, match="1 SBD annotations are missing: .*2008_000005.mat"):
        prepare(["voc2012", "--src", str(voc_raw), "--dst", str(tmp_path / "voc")])
    with pytest.raises(UserError, match="expected benchmark_RELEASE/dataset/cls under"):
        prepare(["voc2012", "--src", str(voc_raw), "--sbd", str(tmp_path), "--dst", str(tmp_path / "voc")])


# ---- folder and the command line -----------------------------------------------------------

def test_folder_pairs_by_relative_name_and_splits_reproducibly(tmp_path):
    for stem in ("a/x", "a/y", "b/z", "w"):
        write_image(tmp_path / "imgs" / f"{stem}.jpg", 3, 3)
        write_gray(tmp_path / "masks" / f"{stem}.png", np.zeros((3, 3)))
    dst = tmp_path / "custom"
    prepare(["folder", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "masks"),
             "--dst", str(dst), "--val-fraction", "0.25"])
    train = (dst / "list/train.txt").read_text().splitlines()
    val = (dst / "list/val.txt").read_text().splitlines()
    assert len(train) == 3 and len(val) == 1
    assert sorted(train + val) == ["images/a/x.jpg labels/a/x.png", "images/a/y.jpg labels/a/y.png",
                                   "images/b/z.jpg labels/b/z.png", "images/w.jpg labels/w.png"]
    assert (dst / "labels").resolve() == (tmp_path / "masks").resolve()
    write_image(tmp_path / "imgs" / "unlabelled.png", 3, 3)
    with pytest.raises(DataError, match=r"1 images under .* have no label PNG .*: .*masks/unlabelled.png"):
        prepare(["folder", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "masks"),
                 "--dst", str(dst)])


def test_existing_destination_that_is_not_our_link_is_refused(ade_raw, tmp_path):
    dst = tmp_path / "ade"
    (dst / "images" / "training").mkdir(parents=True)
    with pytest.raises(UserError, match="images/training is already a folder, not a link to .*; remove it"):
        prepare(["ade20k", "--src", str(ade_raw), "--dst", str(dst)])


def test_command_line_help_and_one_line_error(tmp_path, capsys):
    src = tmp_path / "empty"
    src.mkdir()
    out = run_tool("prepare_dataset.py", "ade20k", "--src", str(src), "--dst", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: not the official ADE20K layout: expected ADEChallengeData2016/images/training under "
        f"{src} (--src may be the folder holding ADEChallengeData2016 or ADEChallengeData2016 "
        f"itself); found in {src}: nothing (empty folder)"]
    with pytest.raises(SystemExit) as exit_info:
        prepare(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("ade20k", "cityscapes", "voc2012", "folder", "--link", "train_aug.txt"):
        assert word in help_text
