import numpy as np

from trainer.augment import geometric, jitter_crop, photometric


def test_geometric_moves_image_and_mask_together():
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 6:20] = 1
    image = np.repeat((mask * 255)[..., None], 3, axis=2)
    for seed in range(20):
        aug_image, aug_mask = geometric(np.random.default_rng(seed), image, mask)
        assert aug_image.shape == image.shape and aug_mask.shape == mask.shape
        bright = aug_image[..., 0] > 127
        assert (bright == (aug_mask > 0)).mean() > 0.97  # borders interpolate differently


def test_same_seed_same_augmentation():
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    a = photometric(np.random.default_rng([1, 2, 3]), geometric(np.random.default_rng([1, 2, 3]), image)[0])
    b = photometric(np.random.default_rng([1, 2, 3]), geometric(np.random.default_rng([1, 2, 3]), image)[0])
    c = photometric(np.random.default_rng([1, 2, 4]), geometric(np.random.default_rng([1, 2, 4]), image)[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_jitter_crop_stays_near_the_inner_window():
    loose = np.zeros((130, 130, 3), np.uint8)
    for seed in range(20):
        crop = jitter_crop(np.random.default_rng(seed), loose, inner=0.75)
        assert 0.75 * 0.88 * 130 - 1 <= crop.shape[0] <= 0.75 * 1.12 * 130 + 1
