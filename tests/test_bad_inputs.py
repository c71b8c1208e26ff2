"""Bad inputs through the real command lines: each is refused with exit status 2 and ONE line on
stderr naming the culprit; the traceback appears only under --debug / SEMSEG_DEBUG=1. Also the
path rules: list entries may leave data_root only when allowed, and outputs never leave save_folder.
"""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_tool, write_config

SAMPLES = ("toy_val_00000", "toy_val_00001")


@pytest.fixture
def data(tiny_toy, tmp_path) -> Path:
    """Two good samples (image + label) and list.txt naming them, ready to be broken."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    for name in SAMPLES:
        shutil.copy(tiny_toy / "images" / "val" / f"{name}.jpg", root / "img")
        shutil.copy(tiny_toy / "labels" / "val" / f"{name}.png", root / "lbl")
    (root / "list.txt").write_text("".join(f"img/{n}.jpg lbl/{n}.png\n" for n in SAMPLES))
    return root


def config_on(data: Path, checkpoint: Path, workers: int = 0) -> Path:
    listing = str(data / "list.txt")
    return write_config(data.parent / "cfg.yaml", data, DATA={"train_list": listing, "val_list": listing},
                        TRAIN={"batch_size": 2, "epochs": 1, "workers": workers},
                        TEST={"test_list": listing, "model_path": str(checkpoint), "names_path": "",
                              "colors_path": ""})


IMAGE, LABEL = f"img/{SAMPLES[0]}.jpg", f"lbl/{SAMPLES[0]}.png"


def corrupt_jpeg(root):
    (root / IMAGE).write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)


def truncate_png(root):
    data = (root / LABEL).read_bytes()
    (root / LABEL).write_bytes(data[:len(data) // 2])


def delete_image(root):
    (root / IMAGE).unlink()


def label_out_of_range(root):
    label = cv2.imread(str(root / LABEL), cv2.IMREAD_UNCHANGED)
    label[0, :3] = 9
    cv2.imwrite(str(root / LABEL), label)


def colour_label(root):
    label = cv2.imread(str(root / LABEL), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / LABEL), np.dstack([label] * 3))


def size_mismatch(root):
    label = cv2.imread(str(root / LABEL), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / LABEL), label[:-5])


def empty_list(root):
    (root / "list.txt").write_text("\n\n")


def three_columns(root):
    with open(root / "list.txt", "a") as f:
        f.write(f"{IMAGE} {LABEL} extra\n")


def non_utf8_list(root):
    with open(root / "list.txt", "ab") as f:
        f.write(b"img/caf\xe9.jpg lbl/caf\xe9.png\n")


# (what breaks, which tool, TRAIN.workers (data-loader workers of both tools), fragments the one line must hold)
DATA_CASES = {
    "corrupt_jpeg": (corrupt_jpeg, "train.py", 2, [IMAGE, "list.txt line 1", "cannot be decoded"]),
    "truncated_png": (truncate_png, "test.py", 2, [LABEL, "list.txt line 1", "cannot be decoded"]),
    "missing_file": (delete_image, "train.py", 0, [IMAGE, "list.txt line 1", "not found"]),
    "label_out_of_range": (label_out_of_range, "test.py", 0, [LABEL, "values [9]", "DATA.classes is 6"]),
    "colour_label": (colour_label, "train.py", 2, [LABEL, "3 channels", "single-channel"]),
    "size_mismatch": (size_mismatch, "test.py", 2, [IMAGE, LABEL, "list.txt line 1", "same size"]),
    "empty_list": (empty_list, "train.py", 0, ["list.txt", "contains no samples"]),
    "three_columns": (three_columns, "test.py", 0, ["list.txt line 3", "has 3 columns", "expected 2 columns"]),
    "non_utf8_list": (non_utf8_list, "train.py", 2, ["list.txt line 3", "not valid UTF-8"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_line_naming_the_file(case, data, checkpoint):
    """Also through DataLoader worker processes (TRAIN.workers 2)."""
    breaks, tool, workers, fragments = DATA_CASES[case]
    cfg = config_on(data, checkpoint, workers)
    breaks(data)
    assert_one_line_error(run_tool(tool, f"--config={cfg}"), *fragments)


# (overrides, tool, fragments); a few go through test.py so both scripts are covered.
CONFIG_CASES = {
    "crop_not_8k_plus_1": (["TRAIN.train_h", "32"], "train.py", ["TRAIN.train_h is 32", "8k+1", "nearest: 25 or 33"]),
    "psa_mask_even": (["TRAIN.arch", "psa", "TRAIN.mask_h", "4", "TRAIN.mask_w", "5"], "train.py",
                      ["TRAIN.mask_h", "odd integer in [3, 5]", "got 4"]),
    "unknown_arch": (["TRAIN.arch", "deeplab"], "train.py", ["TRAIN.arch", "psp, psa", "'deeplab'"]),
    "unknown_layers": (["TRAIN.layers", "19"], "test.py", ["TRAIN.layers", "18, 34, 50, 101, 152", "19"]),
    "wrong_class_count": (["DATA.classes", "5"], "test.py", ["has 6 classes", "DATA.classes is 5"]),
    "override_typo": (["TEST.scale", "[1.0]"], "test.py", ["TEST.scale", "did you mean scales"]),
    "bad_literal": (["TRAIN.base_lr", "[0.1"], "train.py", ["TRAIN.base_lr", "cannot parse '[0.1'", "a number"]),
    "wrong_type": (["TRAIN.epochs", "ten"], "train.py", ["TRAIN.epochs expects an integer", "'ten'"]),
    "scales_empty": (["TEST.scales", "[]"], "test.py", ["TEST.scales is []", "non-empty list of positive"]),
    "scales_negative": (["TEST.scales", "[1.0, -0.5]"], "test.py", ["TEST.scales", "-0.5", "positive"]),
    "one_class": (["DATA.classes", "1"], "train.py", ["DATA.classes is 1", "at least 2 classes"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_setting_is_one_line_naming_the_key(case, data, checkpoint):
    overrides, tool, fragments = CONFIG_CASES[case]
    cfg = config_on(data, checkpoint)
    assert_one_line_error(run_tool(tool, f"--config={cfg}", *overrides), *fragments)


def test_typo_in_a_config_file_names_file_and_line(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"bsae_lr": 0.1})
    line = assert_one_line_error(run_tool("train.py", f"--config={cfg}"), str(cfg), "TRAIN.bsae_lr",
                                 "did you mean base_lr")
    assert " line " in line


def test_checkpoint_that_does_not_fit_is_refused_for_weight_and_resume(tiny_toy, tmp_path, checkpoint):
    """6-class weights for a 5-class run, as TRAIN.weight and TRAIN.resume; weights alone to resume."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"classes": 5})
    weights = torch.load(checkpoint, weights_only=True)
    training = tmp_path / "train_epoch_1.pth"
    torch.save({**weights, "optimizer": {}, "scaler": {}, "best_miou": 0.5, "rng": {}}, training)
    for key, path in (("TRAIN.weight", checkpoint), ("TRAIN.resume", training)):
        out = run_tool("train.py", f"--config={cfg}", key, str(path))
        assert_one_line_error(out, str(path), "has 6 classes", "DATA.classes is 5")
    out = run_tool("train.py", f"--config={cfg}", "DATA.classes", "6", "TRAIN.resume", str(checkpoint))
    assert_one_line_error(out, "TRAIN.resume", str(checkpoint), "not a training checkpoint", "use TRAIN.weight")


def test_checkpoint_mistakes_through_the_scripts_are_one_line(tiny_toy, tmp_path, checkpoint):
    """A text file as TEST.model_path (once a 20-line KeyError), a training checkpoint with 4 KB
    zeroed inside found by `resume auto`, a folder, and `''` (empty, as a YAML literal)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy)
    notes = tmp_path / "notes.txt"
    notes.write_text("best model: epoch 3\n")
    assert_one_line_error(run_tool("test.py", f"--config={cfg}", "TEST.model_path", str(notes)),
                          f"TEST.model_path: {notes} is not a PyTorch checkpoint (it is a text file)")
    assert_one_line_error(run_tool("test.py", f"--config={cfg}", "TEST.model_path", str(tmp_path)),
                          f"TEST.model_path: {tmp_path} is a folder")
    assert_one_line_error(run_tool("test.py", f"--config={cfg}", "TEST.model_path", "''"), "TEST.model_path is not set")

    model = tmp_path / "model"
    model.mkdir()
    weights = torch.load(checkpoint, weights_only=True)
    torch.save({**weights, "optimizer": {}, "scaler": {}, "best_miou": 0.5, "rng": {}}, model / "train_epoch_1.pth")
    data = bytearray((model / "train_epoch_1.pth").read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    (model / "train_epoch_1.pth").write_bytes(data)
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto")
    assert_one_line_error(out, f"TRAIN.resume: {model / 'train_epoch_1.pth'} is damaged", "does not match the checksum")
    assert "to continue from it" not in out.stdout  # no advice to resume from the damaged file


def test_debug_switch_shows_the_traceback(data, checkpoint):
    cfg = config_on(data, checkpoint, workers=2)
    corrupt_jpeg(data)
    for switch, env in ((["--debug"], None), ([], {"SEMSEG_DEBUG": "1"})):
        out = run_tool("train.py", f"--config={cfg}", *switch, env=env)
        assert out.returncode != 0
        assert "Traceback (most recent call last)" in out.stderr and "DataError" in out.stderr
        assert "cannot be decoded" in out.stderr and "error: " not in out.stderr


def outside_sample(tiny_toy: Path, folder: Path, sample: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_toy / "images" / "val" / f"{sample}.jpg", folder / "x.jpg")
    shutil.copy(tiny_toy / "labels" / "val" / f"{sample}.png", folder / "x.png")


def test_paths_leaving_data_root_need_the_opt_in(tiny_toy, tmp_path, checkpoint):
    root = tmp_path / "data"
    outside_sample(tiny_toy, root / "a", "toy_val_00000")
    outside_sample(tiny_toy, tmp_path / "outside", "toy_val_00001")
    outside_sample(tiny_toy, tmp_path / "elsewhere", "toy_val_00002")
    elsewhere = tmp_path / "elsewhere"
    (root / "list.txt").write_text(f"a/x.jpg a/x.png\n../outside/x.jpg ../outside/x.png\n"
                                   f"{elsewhere}/x.jpg {elsewhere}/x.png\n")
    result = tmp_path / "result"
    cfg = write_config(tmp_path / "cfg.yaml", root, TEST={"test_list": str(root / "list.txt"), "names_path": "",
                                                         "colors_path": str(tiny_toy / "toy_colors.txt"),
                                                         "model_path": str(checkpoint), "save_folder": str(result),
                                                         "vis_count": 3})
    out = run_tool("test.py", f"--config={cfg}")
    assert_one_line_error(out, "list.txt line 2", "'../outside/x.jpg'", "DATA.allow_unsafe_paths True")
    (root / "list.txt").write_text(f"a/x.jpg a/x.png\n{elsewhere}/x.jpg {elsewhere}/x.png\n")
    out = run_tool("test.py", f"--config={cfg}")
    assert_one_line_error(out, "list.txt line 2", str(elsewhere / "x.jpg"), "DATA.allow_unsafe_paths True")

    (root / "list.txt").write_text(f"a/x.jpg a/x.png\n../outside/x.jpg ../outside/x.png\n"
                                   f"{elsewhere}/x.jpg {elsewhere}/x.png\n")
    pngs_before = set(tmp_path.rglob("*.png"))
    out = run_tool("test.py", f"--config={cfg}", "DATA.allow_unsafe_paths", "True")
    assert out.returncode == 0, out.stderr[-3000:]
    written = set(tmp_path.rglob("*.png")) - pngs_before
    # gray, color and vis for each image, and the report's confusion.png
    assert len(written) == 3 * 3 + 1, sorted(map(str, written))
    assert all(result in p.parents for p in written), sorted(map(str, written))
    gray = sorted(str(p.relative_to(result / "gray")) for p in (result / "gray").rglob("*.png"))
    assert len(gray) == 3 and "a/x.png" in gray  # the other two: x_<hash of the path>.png, side by side
    assert all("/" not in name and name.startswith("x_") for name in gray if name != "a/x.png")
