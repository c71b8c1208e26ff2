"""List files, lazy loading, label checks and remapping, and worker-independent augmentation."""
import pickle
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import write_config
from util.config import load_config
from util.dataset import SemSegDataset, build_label_lut, check_files_exist, dataset_from_config, read_list_file
from util.errors import ConfigError, DataError
from util.transform import build_train_transform

CFG = SimpleNamespace(train_h=25, train_w=17, scale_min=0.5, scale_max=2.0, rotate_min=-10,
                      rotate_max=10, ignore_label=255)


def write_sample(root, name, height=20, width=30, values=(0, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, np.uint8), (height, width))
    (root / "img").mkdir(exist_ok=True)
    (root / "lbl").mkdir(exist_ok=True)
    cv2.imwrite(str(root / "img" / f"{name}.jpg"), image)
    cv2.imwrite(str(root / "lbl" / f"{name}.png"), label)
    return f"img/{name}.jpg lbl/{name}.png"


def write_list(root, lines, name="list.txt"):
    path = root / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


@pytest.fixture
def three_samples(tmp_path):
    lines = [write_sample(tmp_path, f"s{i}", seed=i) for i in range(3)]
    return tmp_path, write_list(tmp_path, lines)


def dataset_for(root, lines, **kwargs):
    options = dict(split="train", classes=6, ignore_label=255)
    options.update(kwargs)
    return SemSegDataset(write_list(root, lines), str(root), **options)


# ---- list files ------------------------------------------------------------------------------

def test_list_file_joins_paths_and_skips_blank_lines(tmp_path):
    path = write_list(tmp_path, ["a.jpg a.png", "", "   ", "b.jpg\tb.png  "])
    entries = read_list_file(path, "data", "train")
    assert [(e.image_path, e.label_path, e.line) for e in entries] == [
        ("data/a.jpg", "data/a.png", 1), ("data/b.jpg", "data/b.png", 4)]


def test_test_split_takes_one_column(tmp_path):
    entries = read_list_file(write_list(tmp_path, ["a.jpg"]), "data", "test")
    assert entries[0].image_path == "data/a.jpg" and entries[0].label_path is None
    with pytest.raises(DataError, match=r"line 1: has 2 columns, expected 1 column"):
        read_list_file(write_list(tmp_path, ["a.jpg a.png"]), "data", "test")


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match=r"list file .*nope\.txt: not found"):
        read_list_file(str(tmp_path / "nope.txt"), str(tmp_path), "train")


def test_a_missing_list_names_its_config_key_and_how_lists_are_made(tiny_toy, tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"train_list": str(tmp_path / "gone.txt")},
                                   TEST={"test_list": str(tmp_path / "val.txt")}))
    for key in ("train_list", "test_list"):
        with pytest.raises(DataError, match=rf"list file {tmp_path}/\w+\.txt: not found \((DATA|TEST)\.{key}\); write "
                                            r"the lists with tool/prepare_dataset.py .*see docs/datasets.md"):
            dataset_from_config(cfg, getattr(cfg, key), "train")
    cfg.val_list = cfg.test_list  # one file, two keys: both named
    with pytest.raises(DataError, match=r"\(DATA.val_list and TEST.test_list\)"):
        dataset_from_config(cfg, cfg.test_list, "val")


def test_empty_list_file(tmp_path):
    with pytest.raises(DataError, match=r"list\.txt: contains no samples"):
        read_list_file(write_list(tmp_path, ["", "  "]), str(tmp_path), "train")


def test_three_columns_names_line_and_expectation(tmp_path):
    path = write_list(tmp_path, ["a.jpg a.png", "b.jpg b.png extra"])
    with pytest.raises(DataError) as error:
        read_list_file(path, str(tmp_path), "val")
    message = str(error.value)
    assert "list.txt line 2: has 3 columns, expected 2 columns (image path, label path)" in message
    assert "'b.jpg b.png extra'" in message


def test_non_utf8_list_names_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"a.jpg a.png\nb\xff.jpg b.png\n")
    with pytest.raises(DataError, match=r"list\.txt line 2: is not valid UTF-8"):
        read_list_file(str(path), str(tmp_path), "train")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_unsafe_paths_refused_unless_allowed(tmp_path, bad):
    path = write_list(tmp_path, ["a.jpg a.png", f"b.jpg {bad}"])
    with pytest.raises(DataError) as error:
        read_list_file(path, str(tmp_path), "train")
    message = str(error.value)
    assert "line 2" in message and repr(bad) in message and "DATA.allow_unsafe_paths" in message
    entries = read_list_file(path, "root", "train", allow_unsafe_paths=True)
    assert entries[1].label_path.endswith(bad.lstrip("/"))


def test_inner_dotdot_that_stays_inside_root_is_accepted(tmp_path):
    entries = read_list_file(write_list(tmp_path, ["x/../a.jpg a.png"]), "r", "train")
    assert entries[0].image_path == "r/x/../a.jpg"


def test_check_files_exist_names_missing_files_and_lines(three_samples):
    root, _ = three_samples
    entries = read_list_file(write_list(root, ["img/s0.jpg lbl/s0.png", "img/s1.jpg lbl/gone.png"]),
                             str(root), "train")
    with pytest.raises(DataError, match=r"1 listed files not found: .*gone\.png \(.*line 2\)"):
        check_files_exist(entries)
    check_files_exist(entries[:1])


# ---- loading errors --------------------------------------------------------------------------

def test_missing_image_named_with_list_line(three_samples):
    root, _ = three_samples
    dataset = dataset_for(root, ["img/s0.jpg lbl/s0.png", "img/missing.jpg lbl/s1.png"])
    with pytest.raises(DataError,
                       match=r"image .*missing\.jpg \(.*list\.txt line 2\): file not found"):
        dataset[1]


def test_corrupt_jpeg(three_samples):
    root, _ = three_samples
    (root / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg body")
    dataset = dataset_for(root, ["img/bad.jpg lbl/s0.png"])
    with pytest.raises(DataError, match=r"image .*bad\.jpg \(.*line 1\): cannot be decoded"):
        dataset.load_raw(0)


def test_truncated_jpeg(three_samples):
    root, _ = three_samples
    data = (root / "img" / "s0.jpg").read_bytes()
    (root / "img" / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])
    dataset = dataset_for(root, ["img/cut.jpg lbl/s0.png"])
    with pytest.raises(DataError, match=r"cut\.jpg .*corrupt, truncated"):
        dataset.load_raw(0)


def test_truncated_png_label(three_samples):
    root, _ = three_samples
    data = (root / "lbl" / "s0.png").read_bytes()
    (root / "lbl" / "cut.png").write_bytes(data[:len(data) // 2])
    dataset = dataset_for(root, ["img/s0.jpg lbl/cut.png"])
    with pytest.raises(DataError, match=r"label .*cut\.png \(.*line 1\): cannot be decoded"):
        dataset.load_raw(0)


def test_colour_label_refused(three_samples):
    root, _ = three_samples
    cv2.imwrite(str(root / "lbl" / "rgb.png"), np.zeros((20, 30, 3), np.uint8))
    dataset = dataset_for(root, ["img/s0.jpg lbl/rgb.png"])
    with pytest.raises(DataError, match=r"rgb\.png .*3 channels; labels must be single-channel "
                                        r"8-bit PNGs with class ids, not colour images"):
        dataset.load_raw(0)


def test_16bit_label_refused(three_samples):
    root, _ = three_samples
    cv2.imwrite(str(root / "lbl" / "deep.png"), np.zeros((20, 30), np.uint16))
    dataset = dataset_for(root, ["img/s0.jpg lbl/deep.png"])
    with pytest.raises(DataError, match=r"deep\.png .*is 16-bit; labels must be single-channel"):
        dataset.load_raw(0)


def test_size_mismatch_names_both_files_and_sizes(three_samples):
    root, _ = three_samples
    write_sample(root, "small", height=10, width=12)
    dataset = dataset_for(root, ["img/s0.jpg lbl/small.png"])
    with pytest.raises(DataError) as error:
        dataset.load_raw(0)
    message = str(error.value)
    assert "line 1" in message and "s0.jpg is 30x20" in message
    assert "small.png is 12x10" in message


def test_label_values_out_of_range_are_listed(three_samples):
    root, _ = three_samples
    write_sample(root, "wild", values=(0, 7, 9, 255))
    dataset = dataset_for(root, ["img/s0.jpg lbl/s0.png", "img/wild.jpg lbl/wild.png"])
    dataset.load_raw(0)
    with pytest.raises(DataError) as error:
        dataset.load_raw(1)
    assert str(error.value).endswith(
        "wild.png (" + dataset.entries[1].list_path + " line 2): values [7, 9] are outside 0..5 "
        "and not the ignore label 255 (DATA.classes is 6)")


def test_many_bad_values_are_capped(three_samples):
    root, _ = three_samples
    write_sample(root, "many", values=tuple(range(3, 30)))
    dataset = dataset_for(root, ["img/s0.jpg lbl/many.png"], classes=3)
    with pytest.raises(DataError, match=r"values \[3, 4, 5, 6, 7, 8, 9, 10, 11, 12\] "
                                        r"\(and 17 more\) are outside 0\.\.2"):
        dataset.load_raw(0)


# ---- remapping -------------------------------------------------------------------------------

def test_reduce_zero_label_lut():
    lut = build_label_lut(150, 255, reduce_zero_label=True)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[255] == 255


def test_no_remapping_gives_none():
    assert build_label_lut(19, 255) is None


def test_label_map_lut_unmapped_become_ignore():
    lut = build_label_lut(3, 255, label_map={7: 0, 8: 1, 26: 2, 0: 255})
    assert (lut[[7, 8, 26]] == [0, 1, 2]).all()
    assert (np.delete(lut, [7, 8, 26]) == 255).all()


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(reduce_zero_label=True, label_map={1: 0}), r"reduce_zero_label and DATA\.label_map"),
    (dict(label_map={7: 3}), r"DATA\.label_map: 7 -> 3; train ids must be in 0\.\.2"),
    (dict(label_map={300: 0}), r"DATA\.label_map: key 300"),
    (dict(label_map={"a": 0}), r"DATA\.label_map: key 'a'"),
])
def test_label_lut_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_label_lut(3, 255, **kwargs)


def test_dataset_applies_reduce_zero_label(tmp_path):
    line = write_sample(tmp_path, "ade", values=(0, 1, 3))
    raw = cv2.imread(str(tmp_path / "lbl" / "ade.png"), cv2.IMREAD_UNCHANGED)
    dataset = dataset_for(tmp_path, [line], classes=3,
                          label_lut=build_label_lut(3, 255, reduce_zero_label=True))
    _, label, _ = dataset.load_raw(0)
    expected = np.where(raw == 0, 255, raw.astype(int) - 1)
    np.testing.assert_array_equal(label, expected)


def test_dataset_applies_label_map_and_reports_raw_values(tmp_path):
    line = write_sample(tmp_path, "city", values=(7, 8, 26, 33))
    raw = cv2.imread(str(tmp_path / "lbl" / "city.png"), cv2.IMREAD_UNCHANGED)
    lut = build_label_lut(2, 255, label_map={7: 0, 8: 1})
    _, label, _ = dataset_for(tmp_path, [line], classes=2, label_lut=lut).load_raw(0)
    np.testing.assert_array_equal(label, np.select([raw == 7, raw == 8], [0, 1], 255))
    bad = dataset_for(tmp_path, [line], classes=2,
                      label_lut=build_label_lut(2, 255, reduce_zero_label=True))
    with pytest.raises(DataError, match=r"raw values \[7, 8, 26, 33\] remapped to \[6, 7, 25, 32\] "
                                        r"are outside 0\.\.1"):
        bad.load_raw(0)


# ---- samples, determinism, workers -----------------------------------------------------------

def test_getitem_returns_tensors_and_raw_without_transform(three_samples):
    root, list_path = three_samples
    raw = SemSegDataset(list_path, str(root), "train", 6, 255)
    image, label = raw[0]
    assert image.dtype == np.float32 and image.shape == (20, 30, 3)
    assert label.dtype == np.uint8 and label.shape == (20, 30)
    bgr = cv2.imread(str(root / "img" / "s0.jpg"))
    np.testing.assert_array_equal(image, bgr[:, :, ::-1].astype(np.float32))
    augmented = SemSegDataset(list_path, str(root), "train", 6, 255, build_train_transform(CFG))
    image, label = augmented[(4, 2)]
    assert image.shape == (3, 25, 17) and label.dtype == torch.int64
    with pytest.raises(IndexError):
        augmented[3]


def test_test_split_gives_image_only(three_samples):
    root, _ = three_samples
    dataset = SemSegDataset(write_list(root, ["img/s0.jpg", "img/s1.jpg"]), str(root), "test", 6,
                            255, build_train_transform(CFG))
    sample = dataset[1]
    assert len(sample) == 1 and sample[0].shape == (3, 25, 17)
    assert dataset.load_raw(0)[1] is None


def test_augmentation_depends_on_seed_epoch_index_only(three_samples):
    root, list_path = three_samples
    dataset = SemSegDataset(list_path, str(root), "train", 6, 255, build_train_transform(CFG),
                            seed=5)
    first, again = dataset[(3, 1)], dataset[(3, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(dataset[1][0], dataset[(0, 1)][0])
    assert not torch.equal(first[0], dataset[(4, 1)][0])
    reseeded = SemSegDataset(list_path, str(root), "train", 6, 255, build_train_transform(CFG),
                             seed=6)
    assert not torch.equal(first[0], reseeded[(3, 1)][0])


def test_worker_count_does_not_change_samples(three_samples):
    root, list_path = three_samples
    dataset = SemSegDataset(list_path, str(root), "train", 6, 255, build_train_transform(CFG))
    keys = [(epoch, index) for epoch in (0, 1) for index in (2, 0, 1)]

    def load(workers):
        loader = DataLoader(dataset, batch_size=2, sampler=keys, num_workers=workers)
        return [batch for batch in loader]

    single, parallel = load(0), load(2)
    assert len(single) == len(parallel) == 3
    for (image_a, label_a), (image_b, label_b) in zip(single, parallel):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)


def test_dataset_pickles(three_samples):
    root, list_path = three_samples
    dataset = SemSegDataset(list_path, str(root), "train", 6, 255, build_train_transform(CFG),
                            label_lut=build_label_lut(6, 255, reduce_zero_label=True))
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[(1, 0)][0], dataset[(1, 0)][0])
