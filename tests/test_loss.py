"""The training loss and label sizing: semseg's definitions, and the global-batch normalisation
that makes any split over processes and micro-batches give the same loss."""
import pytest
import torch
import torch.nn.functional as F

from util.loss import count_valid, label_at_output_size, segmentation_loss

IGNORE = 255


def random_label(n: int, side: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n, side, side), generator=generator)
    label[torch.rand(n, side, side, generator=generator) < 0.2] = IGNORE
    return label


@pytest.mark.parametrize("zoom", [1, 2, 4, 8])
@pytest.mark.parametrize("side", [33, 97])
def test_label_subsampling_equals_semsegs_bilinear_resize(zoom, side):
    """semseg resizes the label to the output with bilinear, align_corners=True interpolation."""
    label = random_label(2, side, 6, seed=side + zoom)
    out_side = (side - 1) // 8 * zoom + 1
    semseg = F.interpolate(label[:, None].float(), (out_side, out_side), mode="bilinear",
                           align_corners=True)[:, 0].long()
    ours = label_at_output_size(label, zoom)
    assert ours.shape == (2, out_side, out_side)
    assert torch.equal(ours, semseg)


def test_loss_is_semsegs_mean_cross_entropy_with_aux():
    torch.manual_seed(0)
    main, aux = torch.randn(3, 5, 9, 9), torch.randn(3, 5, 9, 9)
    label = random_label(3, 9, 5, seed=1)
    total, main_loss, aux_loss = segmentation_loss(main, aux, label, 0.4, IGNORE, count_valid([label], IGNORE))
    expected_main = F.cross_entropy(main, label, ignore_index=IGNORE)
    expected_aux = F.cross_entropy(aux, label, ignore_index=IGNORE)
    torch.testing.assert_close(main_loss, expected_main)
    torch.testing.assert_close(aux_loss, expected_aux)
    torch.testing.assert_close(total, expected_main + 0.4 * expected_aux)
    only_main, _, zero = segmentation_loss(main, None, label, 0.4, IGNORE, count_valid([label], IGNORE))
    torch.testing.assert_close(only_main, expected_main)
    assert zero.item() == 0


def test_micro_batches_normalised_by_the_global_count_sum_to_the_full_batch_loss():
    """Uneven ignore shares per micro-batch: a per-micro-batch mean would weight pixels unequally."""
    torch.manual_seed(2)
    logits = torch.randn(4, 5, 9, 9)
    label = random_label(4, 9, 5, seed=3)
    label[0, :6] = IGNORE  # the first micro-batch has far fewer valid pixels
    full, _, _ = segmentation_loss(logits, None, label, 0.0, IGNORE, count_valid([label], IGNORE))
    parts = [label[:2], label[2:]]
    normaliser = count_valid(parts, IGNORE)
    split = sum(segmentation_loss(logits[i:i + 2], None, part, 0.0, IGNORE, normaliser)[0]
                for i, part in zip((0, 2), parts))
    torch.testing.assert_close(split, full)
    means = sum(F.cross_entropy(logits[i:i + 2], part, ignore_index=IGNORE) for i, part in zip((0, 2), parts)) / 2
    assert abs(means.item() - full.item()) > 1e-3  # the naive average of means is a different loss
