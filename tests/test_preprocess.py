import numpy as np
import torch
import torchvision.transforms.functional as TF

from dermbatch.bundle import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from dermbatch.preprocess import model_input, normalize, resize_rgb


def _spec(size=(32, 48)):
    return ModelSpec("classification", "timm", "x", size, IMAGENET_MEAN, IMAGENET_STD, (0,))


def test_normalize_matches_torchvision():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = TF.normalize(TF.to_tensor(rgb), IMAGENET_MEAN, IMAGENET_STD).numpy()
    np.testing.assert_allclose(normalize(rgb, _spec()), expected, atol=1e-5)


def test_model_input_has_model_shape_and_dtype():
    rgb = np.zeros((150, 200, 3), np.uint8)
    x = model_input(rgb, _spec((32, 48)))
    assert x.shape == (3, 32, 48) and x.dtype == np.float32 and x.flags.c_contiguous


def test_resize_rgb_keeps_flat_colour_and_skips_same_size():
    rgb = np.full((40, 60, 3), 77, np.uint8)
    assert resize_rgb(rgb, (40, 60)) is rgb
    assert (resize_rgb(rgb, (10, 15)) == 77).all() and (resize_rgb(rgb, (80, 120)) == 77).all()
    small = resize_rgb(np.zeros((300, 400, 3), np.uint8), (30, 40))
    assert small.shape == (30, 40, 3)


def test_normalize_is_torch_compatible():
    x = torch.from_numpy(normalize(np.zeros((4, 4, 3), np.uint8), _spec()))
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0, 0].numpy(), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), rtol=1e-5)
