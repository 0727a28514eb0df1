import numpy as np
import pytest

from dermbatch.bundle import CropSpec
from dermbatch.postprocess import (
    expand_box,
    fill_holes,
    largest_component,
    logit,
    mask_bbox,
    mask_from_logits,
    scale_box,
)
from dermbatch.preprocess import lesion_crop


def test_largest_component_keeps_only_the_biggest_blob():
    mask = np.zeros((20, 20), np.uint8)
    mask[1:4, 1:4] = 1  # 9 px
    mask[10:18, 10:18] = 1  # 64 px
    mask[1:3, 15:19] = 1  # 8 px
    out = largest_component(mask)
    assert out.sum() == 64 and out[10:18, 10:18].all()


def test_fill_holes_fills_enclosed_background_only():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:8, 2:8] = 1
    mask[4:6, 4:6] = 0  # hole
    mask[0:3, 0] = 1  # touches the border: nothing enclosed there
    out = fill_holes(mask)
    assert out[4:6, 4:6].all()
    assert out[0, 1] == 0 and out.sum() == 36 + 3


def test_fill_holes_keeps_a_ring_touching_the_border_open_outside():
    mask = np.ones((6, 6), np.uint8)
    mask[2:4, 2:4] = 0
    assert fill_holes(mask).all()


def test_mask_from_logits_thresholds_at_probability_and_resizes():
    logits = np.full((4, 4), -5.0, np.float32)
    logits[1:3, 1:3] = 5.0
    mask = mask_from_logits(logits, (40, 40), threshold=0.5)
    assert mask.shape == (40, 40) and mask.dtype == np.uint8
    assert mask[20, 20] == 1 and mask[2, 2] == 0
    assert 0.15 < mask.mean() < 0.35  # about the central quarter
    # a threshold above the lesion's probability removes it
    assert not mask_from_logits(logits, (40, 40), threshold=0.999).any()


def test_logit_is_inverse_sigmoid():
    assert 1 / (1 + np.exp(-logit(0.8))) == pytest.approx(0.8)


def test_mask_bbox():
    mask = np.zeros((10, 12), np.uint8)
    assert mask_bbox(mask) is None
    mask[2:5, 3:9] = 1
    assert mask_bbox(mask) == (3, 2, 6, 3)


@pytest.mark.parametrize("box,size,margin,square,expected", [
    ((10, 10, 20, 10), (100, 100), 0.0, False, (10, 10, 20, 10)),
    ((10, 10, 20, 10), (100, 100), 0.5, False, (0, 5, 40, 20)),  # x clamped at 0
    ((40, 40, 20, 10), (100, 100), 0.0, True, (40, 35, 20, 20)),
    ((90, 90, 10, 10), (100, 100), 1.0, False, (80, 80, 20, 20)),  # clamped at the far edges
])
def test_expand_box(box, size, margin, square, expected):
    assert expand_box(box, size, margin, square) == expected


def test_a_square_crop_box_is_square_away_from_the_borders():
    """Rounding each edge on its own once gave 27 x 26 "squares" (and 256 x 257 Grad-CAM images)."""
    assert expand_box((10, 11, 21, 14), (100, 100), 0.1, True) == (7, 5, 26, 26)
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(1, 60, 2))
        x, y = (int(v) for v in rng.integers(100, 200, 2))
        bx, by, bw, bh = expand_box((x, y, w, h), (400, 400), float(rng.uniform(0, 0.5)), True)
        assert bw == bh and bx <= x and by <= y and bx + bw >= x + w and by + bh >= y + h


def test_scale_box_maps_between_resolutions():
    assert scale_box((10, 20, 30, 40), (100, 200), (400, 800)) == (40, 80, 120, 160)


def test_lesion_crop_cuts_the_expanded_box_from_the_image():
    rgb = np.arange(100 * 120 * 3, dtype=np.uint32).reshape(100, 120, 3).astype(np.uint8)
    mask = np.zeros((100, 120), np.uint8)
    mask[40:60, 50:90] = 1
    crop, box = lesion_crop(rgb, mask, CropSpec(margin=0.25, square=False))
    assert box == (40, 35, 60, 30)
    np.testing.assert_array_equal(crop, rgb[35:65, 40:100])


def test_lesion_crop_without_lesion_returns_whole_image():
    rgb = np.zeros((10, 10, 3), np.uint8)
    crop, box = lesion_crop(rgb, np.zeros((10, 10), np.uint8), CropSpec())
    assert box is None and crop is rgb


def test_lesion_crop_background_mask_paints_outside_pixels():
    rgb = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    mask[5, 5] = 0
    crop, box = lesion_crop(rgb, mask, CropSpec(margin=0.0, square=False, background="mask"))
    assert box == (5, 5, 10, 10)
    assert (crop[0, 0] == [124, 116, 104]).all() and (crop[5, 5] == 200).all()
