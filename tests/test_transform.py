"""Joint image/label transforms: order, padding, label safety, determinism, output format."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from util.transform import (MEAN, STD, Crop, Normalize, RandomGaussianBlur,
                            RandomHorizontalFlip, RandRotate, RandScale, Resize, ToTensor,
                            build_train_transform, build_val_transform)

CFG = SimpleNamespace(train_h=33, train_w=41, scale_min=0.5, scale_max=2.0, rotate_min=-10,
                      rotate_max=10, ignore_label=255)


def make_pair(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    label = rng.integers(0, 3, (height, width)).astype(np.uint8)
    return image, label


def test_mean_std_constants_are_imagenet_statistics_in_0_255():
    np.testing.assert_allclose(MEAN, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(STD, [58.395, 57.12, 57.375])


def test_center_crop_pads_evenly_with_mean_and_ignore():
    image, label = make_pair(5, 7)
    out_image, out_label = Crop((10, 12), "center", MEAN, 255)(image, label, None)
    assert out_image.shape == (10, 12, 3) and out_label.shape == (10, 12)
    # pad_h = 5 -> 2 rows above, 3 below; pad_w = 5 -> 2 columns left, 3 right.
    np.testing.assert_array_equal(out_image[2:7, 2:9], image)
    np.testing.assert_array_equal(out_label[2:7, 2:9], label)
    border = np.ones((10, 12), bool)
    border[2:7, 2:9] = False
    np.testing.assert_allclose(out_image[border], np.tile(MEAN, (border.sum(), 1)), rtol=1e-6)
    assert (out_label[border] == 255).all()


def test_random_crop_takes_an_aligned_window_inside_the_image():
    rows, cols = np.mgrid[0:40, 0:50]
    image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)
    label = (rows % 7).astype(np.uint8)
    offsets = set()
    for seed in range(20):
        out_image, out_label = Crop((17, 9), "rand", MEAN, 255)(image, label,
                                                                np.random.default_rng(seed))
        top, left = int(out_image[0, 0, 0]), int(out_image[0, 0, 1])
        np.testing.assert_array_equal(out_image, image[top:top + 17, left:left + 9])
        np.testing.assert_array_equal(out_label, label[top:top + 17, left:left + 9])
        offsets.add((top, left))
    assert len(offsets) > 10


def test_random_crop_pads_smaller_image_like_center_crop():
    image, label = make_pair(6, 30)
    out_image, out_label = Crop((11, 30), "rand", MEAN, 255)(image, label,
                                                             np.random.default_rng(1))
    np.testing.assert_array_equal(out_image[2:8], image)
    assert (out_label[:2] == 255).all() and (out_label[8:] == 255).all()


def test_rotation_keeps_label_values_and_fills_corners():
    image, label = make_pair(40, 60)
    rotate = RandRotate(30, 30, MEAN, 255, p=1.0)
    out_image, out_label = rotate(image, label, np.random.default_rng(0))
    assert out_label.dtype == np.uint8 and out_label.shape == label.shape
    assert set(np.unique(out_label)) <= {0, 1, 2, 255}
    assert out_label[0, 0] == 255 and out_label[-1, -1] == 255
    np.testing.assert_allclose(out_image[0, 0], MEAN, rtol=1e-5)


def test_rotation_probability_zero_is_identity():
    image, label = make_pair(20, 20)
    out_image, out_label = RandRotate(-10, 10, MEAN, 255, p=0.0)(image, label,
                                                                  np.random.default_rng(0))
    assert out_image is image and out_label is label


def test_flip_mirrors_image_and_label_together():
    image, label = make_pair(8, 9)
    out_image, out_label = RandomHorizontalFlip(p=1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_label, label[:, ::-1])


def test_blur_is_5x5_gaussian_on_image_only():
    image, label = make_pair(16, 16)
    out_image, out_label = RandomGaussianBlur(p=1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, cv2.GaussianBlur(image, (5, 5), 0))
    assert out_label is label


def test_scale_resizes_label_with_nearest_values_only():
    image, label = make_pair(30, 50)
    for seed in range(5):
        out_image, out_label = RandScale(0.5, 2.0)(image, label, np.random.default_rng(seed))
        scale = out_label.shape[1] / 50
        assert 0.5 - 0.02 <= scale <= 2.0 + 0.02
        assert out_image.shape[:2] == out_label.shape
        assert abs(out_label.shape[0] - 30 * scale) <= 1
        assert set(np.unique(out_label)) <= {0, 1, 2}


def test_resize_gives_exact_size():
    image, label = make_pair(30, 50)
    out_image, out_label = Resize((17, 23))(image, label, None)
    assert out_image.shape == (17, 23, 3) and out_label.shape == (17, 23)
    assert set(np.unique(out_label)) <= {0, 1, 2}


def test_to_tensor_and_normalize_format():
    image = np.tile(np.array(MEAN, np.float32), (4, 5, 1))
    image[0, 0] = [255, 255, 255]
    label = np.full((4, 5), 255, np.uint8)
    tensor, label_tensor = ToTensor()(image, label, None)
    tensor, label_tensor = Normalize()(tensor, label_tensor, None)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert label_tensor.dtype == torch.int64 and int(label_tensor[0, 0]) == 255
    assert torch.allclose(tensor[:, 1:, 1:], torch.zeros(1), atol=1e-5)
    expected = (255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(tensor[:, 0, 0], expected)


@pytest.mark.parametrize("size", [(20, 25), (60, 90)])
def test_train_transform_output_ready_to_collate(size):
    image, label = make_pair(*size)
    out_image, out_label = build_train_transform(CFG)(image, label, np.random.default_rng(3))
    assert out_image.shape == (3, 33, 41) and out_image.dtype == torch.float32
    assert out_label.shape == (33, 41) and out_label.dtype == torch.int64
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 255}


def test_train_transform_depends_only_on_generator_seed():
    image, label = make_pair(50, 70)
    transform = build_train_transform(CFG)
    first = transform(image, label, np.random.default_rng([0, 1, 2]))
    again = transform(image, label, np.random.default_rng([0, 1, 2]))
    other = transform(image, label, np.random.default_rng([0, 2, 2]))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_val_transform_is_deterministic_center_crop():
    image, label = make_pair(50, 70)
    transform = build_val_transform(CFG)
    first = transform(image, label, np.random.default_rng(0))
    second = transform(image, label, np.random.default_rng(99))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    np.testing.assert_array_equal(first[1].numpy(), label[8:41, 14:55])
