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


def test_shades_of_gray_removes_a_colour_cast_and_gamma_brightens():
    from dermbatch.bundle import PreprocessSpec
    from dermbatch.preprocess import correct_colors

    cast = np.zeros((8, 8, 3), np.uint8)
    cast[:] = (200, 100, 50)
    neutral = correct_colors(cast, PreprocessSpec(color_constancy="shades_of_gray"))
    assert np.ptp(neutral[0, 0].astype(int)) <= 1
    gray = np.full((2, 2, 3), 64, np.uint8)
    assert correct_colors(gray, PreprocessSpec(gamma=2.0))[0, 0, 0] == round(255 * (64 / 255) ** 0.5)
    assert correct_colors(gray, PreprocessSpec()) is gray


def test_run_applies_the_bundles_colour_correction(tiny_bundle, tmp_path):
    import json
    import shutil

    import cv2

    from dermbatch.cli.main import main

    bundle = shutil.copytree(tiny_bundle.path, tmp_path / "b")
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["preprocessing"] = {"color_constancy": "none", "gamma": 2.0}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    image = np.full((40, 40, 3), 64, np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    assert main(["run", str(tmp_path / "x.png"), "--out", str(tmp_path / "r.csv"), "--model", str(bundle),
                 "--crops", str(tmp_path / "crops"), "-q"]) == 0
    crop = cv2.imread(str(tmp_path / "crops" / "x_crop.png"))
    assert abs(int(crop.mean()) - round(255 * (64 / 255) ** 0.5)) <= 1
