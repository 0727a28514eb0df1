import numpy as np
import pytest

from dermbatch.tta import apply_view, classify_with_tta, invert_view, segment_with_tta, softmax, views


@pytest.mark.parametrize("mode,count", [("none", 1), ("flip", 4), ("d4", 8)])
def test_views_are_distinct_and_invertible(mode, count):
    x = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    vs = views(mode)
    assert len(vs) == count
    transformed = [apply_view(x, v) for v in vs]
    assert len({t.tobytes() for t in transformed}) == count
    for v, t in zip(vs, transformed, strict=False):
        np.testing.assert_array_equal(invert_view(t, v), x)


def test_flip_views_match_numpy_flips():
    x = np.random.default_rng(0).normal(size=(1, 1, 4, 6))
    expected = [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]  # id, h, v, hv
    for v, e in zip(views("flip"), expected, strict=False):
        np.testing.assert_array_equal(apply_view(x, v), e)


def test_d4_views_are_the_eight_symmetries_of_a_square():
    x = np.arange(9).reshape(3, 3)
    expected = {np.rot90(m, k).tobytes() for m in (x, x.T) for k in range(4)}
    assert {apply_view(x, v).tobytes() for v in views("d4")} == expected


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="none, flip, d4"):
        views("rot")


def _two_fold_identity_model(batch):
    """Fake model: fold 0 returns channel 0 as mask logits, fold 1 returns twice that."""
    logits = batch[:, :1]
    return np.stack([logits, 2 * logits])


@pytest.mark.parametrize("mode", ["none", "flip", "d4"])
def test_segmentation_tta_inverts_each_view_before_averaging(mode):
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    out = segment_with_tta(_two_fold_identity_model, x, mode)
    # an equivariant model gives back its own output: mean over folds of (1x, 2x) = 1.5x
    np.testing.assert_allclose(out, 1.5 * x[:, :1], rtol=1e-6)


def test_segmentation_tta_averages_a_non_equivariant_model_by_hand():
    x = np.zeros((1, 1, 2, 2), np.float32)
    position = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)

    def model(batch):  # ignores the input: always the same position map
        return np.stack([np.broadcast_to(position, batch.shape).copy()])

    out = segment_with_tta(model, x, "flip")
    # views id, h, v, hv mapped back: position, fliplr, flipud, rot180 -> all average to 1.5
    np.testing.assert_allclose(out[0, 0], np.full((2, 2), 1.5))


def test_classification_tta_averages_logits_over_folds_and_views():
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 4)).astype(np.float32)

    def model(batch):  # logits depend on the top-left pixel, so views differ
        corner = batch[:, 0, 0, 0]
        return np.stack([np.stack([corner, -corner], 1), np.stack([corner, corner], 1) + 1])

    out = classify_with_tta(model, x, "flip")
    corners = np.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]])  # id, h, v, hv
    mean_corner = corners.mean(0)
    expected = np.stack([(mean_corner + mean_corner + 1) / 2, (-mean_corner + mean_corner + 1) / 2], 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_softmax_rows_sum_to_one_and_handle_large_logits():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    assert p[0, 0] == pytest.approx(1.0)
