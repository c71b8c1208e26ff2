"""Batched sliding-window inference equals a per-window float64 reference written like semseg's test.py."""
import inspect

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from util.config import FIELDS
from util.inference import (multi_scale_predict, resize_image, scaled_size, sliding_window_predict, window_coverage,
                            window_grid, window_offsets)
from util.palette import output_names
from util.reference_inference import reference_predict
from util.transform import MEAN, STD


class TinySegNet(nn.Module):
    """Random stand-in for PSPNet: 1/8 features, logits upsampled to (in - 1) / 8 * 8 + 1."""

    def __init__(self, classes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, classes, 1))

    def forward(self, x):
        h, w = x.shape[-2:]
        out = self.body(x)
        return F.interpolate(out, ((h - 1) // 8 * 8 + 1, (w - 1) // 8 * 8 + 1), mode="bilinear", align_corners=True)


CASES = [  # (h, w, scales, flip, base_size): smaller than the crop, portrait, landscape, multi-scale
    (20, 27, [1.0], True, 27),
    (70, 45, [1.0], False, 70),
    (45, 90, [0.75, 1.25], True, 90),
    (61, 61, [0.5, 1.0, 1.5], True, 64),
]


@pytest.mark.parametrize("h, w, scales, flip, base_size", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_equals_per_window_reference(h, w, scales, flip, base_size, seed):
    classes, crop = 5, 33
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.float32)
    image = cv2.GaussianBlur(image, (5, 5), 0)  # some spatial structure
    model = TinySegNet(classes, seed).eval()
    ours = multi_scale_predict(model, [resize_image(image, round(s * base_size)) for s in scales], (h, w),
                               classes, crop, crop, 2 / 3, flip, batch_size=3)
    ref = reference_predict(model.double(), image, classes, crop, crop, base_size, scales, 2 / 3, flip)
    ours = ours.numpy().transpose(1, 2, 0)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5
    assert np.array_equal(ours.argmax(2), ref.argmax(2))


class WindowRecorder(nn.Module):
    """Zero logits; notes the image column at the left edge of every window it is given (the test
    image stores its column index in its red and green values)."""

    def __init__(self):
        super().__init__()
        self.columns = []

    def forward(self, x):
        pixel = x[:, :2, 0, 0].double() * torch.tensor(STD[:2]).double() + torch.tensor(MEAN[:2]).double()
        self.columns += [int(round(red + 256 * green)) for red, green in pixel.tolist()]
        return x.new_zeros(x.shape[0], 2, *x.shape[2:])


def test_windows_step_by_ceil_of_two_thirds_of_the_crop_in_both_algorithms():
    """semseg's stride is ceil(crop * 2/3): 316 for 473 (floor would give 315). On a 1104-px side
    that is 3 windows at 0, 316 and 631; with 315 it would be 4 (0, 315, 630, 631)."""
    assert FIELDS["stride_rate"].default == 2 / 3
    for function in (sliding_window_predict, multi_scale_predict, reference_predict):
        assert inspect.signature(function).parameters["stride_rate"].default == 2 / 3, function.__name__
    assert window_offsets(473, 1104, 473, 473, 2 / 3) == ([0], [0, 316, 631])
    column = np.arange(1104)
    image = np.zeros((473, 1104, 3), np.float32)
    image[..., 0], image[..., 1] = column % 256, column // 256
    ours, reference = WindowRecorder(), WindowRecorder()
    multi_scale_predict(ours, [image], (473, 1104), 2, 473, 473, flip=False)
    reference_predict(reference.double(), image, 2, 473, 473, 1104, [1.0], flip=False)
    assert sorted(ours.columns) == sorted(reference.columns) == [0, 316, 631]


def test_window_grid_covers_and_aligns_last_window():
    grid = window_grid(100, 40, 33, 33, 2 / 3)
    ys, xs = sorted({y for y, _ in grid}), sorted({x for _, x in grid})
    assert ys == [0, 22, 44, 66, 67]
    assert ys[-1] + 33 == 100 and xs == [0, 7]
    cover = np.zeros((100, 40), int)
    for y, x in grid:
        cover[y:y + 33, x:x + 33] += 1
    assert cover.min() >= 1


@pytest.mark.parametrize("h, w, crop, rate", [(100, 40, 33, 2 / 3), (33, 33, 33, 2 / 3), (97, 130, 33, 0.5),
                                              (70, 71, 17, 1.0)])
def test_coverage_from_row_and_column_counts_equals_counting_every_window(h, w, crop, rate):
    cover = np.zeros((h, w), int)
    for y, x in window_grid(h, w, crop, crop, rate):
        cover[y:y + crop, x:x + crop] += 1
    rows, columns = window_offsets(h, w, crop, crop, rate)
    outer = torch.outer(window_coverage(h, crop, rows), window_coverage(w, crop, columns))
    assert np.array_equal(outer.numpy().astype(int), cover)


def test_pinned_style_tensor_input_equals_numpy_input():
    """test.py hands over the DataLoader's (possibly pinned) HxWx3 tensors, demo.py numpy arrays."""
    image = (np.random.default_rng(5).random((40, 52, 3)) * 255).astype(np.float32)
    model = TinySegNet(4, 5).eval()
    scaled = [resize_image(image, s) for s in (39, 65)]
    from_numpy = multi_scale_predict(model, scaled, (40, 52), 4, 33, 33)
    from_tensor = multi_scale_predict(model, [torch.from_numpy(s) for s in scaled], (40, 52), 4, 33, 33)
    assert torch.equal(from_numpy, from_tensor)


def test_scaled_size_keeps_aspect_with_semseg_rounding():
    assert scaled_size(375, 500, 512) == (384, 512)
    assert scaled_size(500, 375, 512) == (512, 384)
    assert scaled_size(1024, 2048, round(1.75 * 2048)) == (1792, 3584)
    assert scaled_size(1, 200, 32) == (1, 32) and scaled_size(200, 1, 32) == (32, 1)  # not 0: cv2 would assert
    assert resize_image(np.zeros((1, 200, 3), np.float32), 32).shape == (1, 32, 3)


def test_output_names_keep_relative_path_on_clashes(tmp_path):
    root = str(tmp_path)
    assert output_names([f"{root}/a/x.jpg", f"{root}/b/y.jpg"], root) == ["x", "y"]
    assert output_names([f"{root}/a/x.jpg", f"{root}/b/x.jpg"], root) == ["a/x", "b/x"]
    names = output_names([f"{root}/a/x.jpg", "/elsewhere/x.jpg"], root)
    assert names[0] == "a/x" and names[1].startswith("x_") and "/" not in names[1] and ".." not in names[1]


def test_many_classes_as_ade20k():
    """150 classes: the probability maps are resized with every channel (OpenCV takes few per call)."""
    classes, crop = 150, 33
    image = (np.random.default_rng(3).random((40, 52, 3)) * 255).astype(np.float32)
    model = TinySegNet(classes, 3).eval()
    ours = multi_scale_predict(model, [resize_image(image, s) for s in (39, 65)], (40, 52), classes, crop, crop)
    ref = reference_predict(model.double(), image, classes, crop, crop, 52, [0.75, 1.25], 2 / 3, True)
    ours = ours.numpy().transpose(1, 2, 0)
    assert np.abs(ours - ref).max() < 1e-5
    assert np.array_equal(ours.argmax(2), ref.argmax(2))


def test_output_names_same_stem_other_extension(tmp_path):
    names = output_names([f"{tmp_path}/a/x.jpg", f"{tmp_path}/a/x.png", f"{tmp_path}/b/x.jpg"], str(tmp_path))
    assert len(set(names)) == 3 and names[2] == "b/x" and all(n.startswith("a/x_") for n in names[:2])


def test_bf16_network_keeps_float32_probabilities_close_to_fp32():
    """TEST.test_amp bf16: the network runs in bf16 (results move), softmax and averaging stay float32."""
    image = cv2.GaussianBlur((np.random.default_rng(6).random((45, 90, 3)) * 255).astype(np.float32), (5, 5), 0)
    model = TinySegNet(5, 6).eval()
    scaled = [resize_image(image, s) for s in (68, 90)]
    fp32 = multi_scale_predict(model, scaled, (45, 90), 5, 33, 33)
    bf16 = multi_scale_predict(model, scaled, (45, 90), 5, 33, 33, amp="bf16")
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.02
    assert torch.allclose(bf16.sum(0), torch.ones(45, 90), atol=1e-5)
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean() > 0.98


@pytest.mark.parametrize("flip", [True, False])
def test_predictor_follows_its_flip_setting_as_the_reference_does(flip):
    """The Predictor's probabilities against semseg's per-window algorithm with the same flip setting,
    on a network whose flipped output differs, so that a Predictor ignoring `flip` fails one case."""
    from util.predictor import Predictor
    classes, crop, base_size, scales = 5, 33, 50, [0.75, 1.0]
    image = cv2.GaussianBlur((np.random.default_rng(3).random((40, 50, 3)) * 255).astype(np.float32), (5, 5), 0)
    model = TinySegNet(classes, 3).eval()
    ours = Predictor(model, classes, (crop, crop), base_size, scales, flip=flip).probabilities(image).numpy()
    ref = reference_predict(model.double(), image, classes, crop, crop, base_size, scales, 2 / 3, flip)
    other = reference_predict(model, image, classes, crop, crop, base_size, scales, 2 / 3, not flip)
    assert np.abs(ours.transpose(1, 2, 0) - ref).max() < 1e-5
    assert np.abs(ref - other).max() > 1e-3  # flip matters for this network and image
