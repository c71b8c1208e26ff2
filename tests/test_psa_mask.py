"""psa_mask (cached index gather) against the literal loop definition, values and gradients."""
import itertools

import pytest
import torch

from lib.psa import psa_mask, psa_mask_reference
from lib.psa.mask import _gather_index

# (batch, height, width): square, wide, tall, single-row maps.
SHAPES = [(2, 3, 3), (1, 4, 6), (2, 5, 2), (1, 1, 4)]


def _odd_sides(side: int):
    return range(3, max(3, 2 * side - 1) + 1, 2)


def _cases():
    for (n, h, w), psa_type in itertools.product(SHAPES, ("collect", "distribute")):
        for mask_h, mask_w in itertools.product(_odd_sides(h), _odd_sides(w)):
            yield n, h, w, mask_h, mask_w, psa_type


@pytest.mark.parametrize("n,h,w,mask_h,mask_w,psa_type", list(_cases()))
def test_matches_loop_definition_in_value_and_gradient(n, h, w, mask_h, mask_w, psa_type):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + mask_h + mask_w)
    x = torch.randn(n, mask_h * mask_w, h, w, generator=g)
    upstream = torch.randn(n, h * w, h, w, generator=g)
    fast_in = x.clone().requires_grad_(True)
    slow_in = x.clone().requires_grad_(True)

    fast = psa_mask(fast_in, psa_type, mask_h, mask_w)
    slow = psa_mask_reference(slow_in, psa_type, mask_h, mask_w)
    (fast * upstream).sum().backward()
    (slow * upstream).sum().backward()

    assert fast.shape == (n, h * w, h, w)
    assert torch.equal(fast, slow)
    assert torch.equal(fast_in.grad, slow_in.grad)


def test_collect_places_window_centre_on_the_diagonal_and_distribute_is_its_transpose():
    x = torch.zeros(1, 9, 3, 3)
    x[:, 4] = 1.0  # centre of a 3x3 window: offset (0, 0)
    collect = psa_mask(x, 0, 3, 3).view(9, 9)
    assert torch.equal(collect, torch.eye(9))
    y = torch.randn(1, 25, 3, 4)
    assert torch.equal(psa_mask(y, "distribute", 5, 5).view(12, 12), psa_mask(y, "collect", 5, 5).view(12, 12).t())


def test_collect_and_distribute_follow_the_formula_off_centre():
    """Hand-computed from the formula (lib/psa/mask.py, semseg's op) on a 3x4 map with a 3x5 mask
    (half 1, 2), so that swapping the two types, or the loop reference sharing a wrong mapping,
    changes the answer:
      x[4] at (1, 1): offset (i, j) = (0, 4) -> (-1, +2) lands on (0, 3), flat 3
      x[10] at (0, 3): offset (2, 0) -> (+1, -2) lands on (1, 1), flat 5
      x[0] at (0, 0) and x[13] at (2, 0) land outside the map and are dropped.
    collect writes out[target, pixel], distribute out[pixel, target]."""
    x = torch.zeros(1, 15, 3, 4)
    x[0, 4, 1, 1], x[0, 10, 0, 3], x[0, 0, 0, 0], x[0, 13, 2, 0] = 7.0, 2.0, 9.0, 5.0
    collect = torch.zeros(1, 12, 3, 4)
    collect[0, 3, 1, 1] = 7.0  # out[(h+i-half_h)*W + (w+j-half_w), h, w] = x[i*mask_w + j, h, w]
    collect[0, 5, 0, 3] = 2.0
    distribute = torch.zeros(1, 12, 3, 4)
    distribute[0, 5, 0, 3] = 7.0  # out[h*W + w, h+i-half_h, w+j-half_w] = x[i*mask_w + j, h, w]
    distribute[0, 3, 1, 1] = 2.0
    for implementation in (psa_mask, psa_mask_reference):
        assert torch.equal(implementation(x, "collect", 3, 5), collect), implementation.__name__
        assert torch.equal(implementation(x, 0, 3, 5), collect), implementation.__name__
        assert torch.equal(implementation(x, "distribute", 3, 5), distribute), implementation.__name__
        assert torch.equal(implementation(x, 1, 3, 5), distribute), implementation.__name__


def test_integer_and_named_types_agree_and_dtype_is_kept():
    x = torch.randn(1, 15, 4, 3, dtype=torch.float64)
    out = psa_mask(x, 1, 3, 5)
    assert out.dtype == torch.float64
    assert torch.equal(out, psa_mask(x, "distribute", 3, 5))
    assert torch.equal(out, psa_mask_reference(x, 1, 3, 5))


def test_index_is_built_once_per_geometry():
    x = torch.randn(1, 9, 7, 5)
    psa_mask(x, 0, 3, 3)
    hits = _gather_index.cache_info().hits
    psa_mask(x * 2, "collect", 3, 3)
    assert _gather_index.cache_info().hits == hits + 1


@pytest.mark.parametrize("mask_h,mask_w", [(4, 3), (3, 2), (0, 3)])
def test_even_or_empty_mask_is_rejected(mask_h, mask_w):
    x = torch.randn(1, max(mask_h * mask_w, 1), 4, 4)
    with pytest.raises(ValueError, match="must be a positive odd number"):
        psa_mask(x, 0, mask_h, mask_w)


def test_channel_count_must_equal_mask_area():
    with pytest.raises(ValueError, match=r"mask_h\*mask_w=9"):
        psa_mask(torch.randn(1, 8, 4, 4), "collect", 3, 3)


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="psa_type"):
        psa_mask(torch.randn(1, 9, 4, 4), 2, 3, 3)


def test_index_cached_under_inference_mode_still_trains():
    """Evaluation (inference mode) may fill the index cache first; training must still backpropagate."""
    x = torch.randn(1, 9, 5, 6)
    with torch.inference_mode():
        psa_mask(x, "collect", 3, 3)
    y = x.clone().requires_grad_()
    psa_mask(y, "collect", 3, 3).sum().backward()
    assert y.grad is not None
