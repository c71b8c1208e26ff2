"""Metrics against hand-computed cases, numpy == torch, and merging of partial matrices."""
import numpy as np
import pytest
import torch

from util.metrics import ConfusionMatrix, confusion_matrix, format_scores_table, scores_from_confusion

# 3 classes, ignore 255. Hand count: truth row-major.
TARGET = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])


def test_hand_computed_scores():
    conf = confusion_matrix(PRED, TARGET, 3, 255)
    # truth 0: pred 0,1 ; truth 1: pred 1,1,0 ; truth 2: pred 2,0 ; the ignored pixel is skipped
    assert conf.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    s = scores_from_confusion(conf)
    assert s.intersection.tolist() == [1, 2, 1]
    assert s.target.tolist() == [2, 3, 2]
    assert s.union.tolist() == [2 + 3 - 1, 3 + 3 - 2, 2 + 1 - 1]
    np.testing.assert_allclose(s.iou, [1 / 4, 2 / 4, 1 / 2])
    np.testing.assert_allclose(s.acc, [1 / 2, 2 / 3, 1 / 2])
    assert s.miou == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert s.macc == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s.allacc == pytest.approx(4 / 7)


def test_absent_class_is_na_and_excluded():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    s = scores_from_confusion(confusion_matrix(pred, target, 3, 255))
    assert np.isnan(s.iou[2]) and np.isnan(s.acc[2])
    assert s.miou == pytest.approx((2 / 3 + 1 / 2) / 2)  # IoU 0: 2/3, IoU 1: 1/2
    assert "n/a" in format_scores_table(s, ["a", "b", "c"])
    assert s.as_dict(["a", "b", "c"])["classes"][2]["iou"] is None


def test_predicted_but_absent_from_truth_counts_zero_iou():
    s = scores_from_confusion(confusion_matrix(np.array([2, 0]), np.array([0, 0]), 3, 255))
    assert s.iou[2] == 0.0 and np.isnan(s.acc[2])
    assert s.miou == pytest.approx((0.5 + 0.0) / 2)


def test_torch_equals_numpy_and_merge():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 17, 19))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=target.shape)
    whole = confusion_matrix(pred, target, 5, 255)
    cm = ConfusionMatrix(5, 255)
    for i in range(3):  # accumulated in pieces, as processes would
        cm.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    cm.reduce()
    assert np.array_equal(cm.mat.numpy(), whole)
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 5).permute(0, 3, 1, 2).float()
    cm2 = ConfusionMatrix(5, 255)
    cm2.update(logits, torch.from_numpy(target))
    assert np.array_equal(cm2.mat.numpy(), whole)


def test_matches_semseg_intersection_and_union():
    """semseg computes areas with histograms after setting ignored pixels to ignore in the output."""
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=500)
    target[:50] = 255
    pred = rng.integers(0, 4, size=500)
    out = pred.copy()
    out[target == 255] = 255
    inter = out[out == target]
    area_i = np.histogram(inter, bins=4, range=(0, 3))[0]
    area_o = np.histogram(out, bins=4, range=(0, 3))[0]
    area_t = np.histogram(target, bins=4, range=(0, 3))[0]
    s = scores_from_confusion(confusion_matrix(pred, target, 4, 255))
    assert s.intersection.tolist() == area_i.tolist()
    assert s.union.tolist() == (area_o + area_t - area_i).tolist()
    assert s.target.tolist() == area_t.tolist()


def test_reduce_puts_the_matrix_on_the_process_device():
    """has_prediction counts on the host; NCCL can only reduce a matrix on the GPU."""
    matrix = ConfusionMatrix(3, 255, device="meta")
    matrix.update_numpy(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 255]]))
    assert matrix.mat.device.type == "cpu"
    matrix.reduce()
    assert matrix.mat.device.type == "meta"
