"""Mask quality: the statistics of a segmentation, the bundle's calibrated models over them, their fitting on
real images (``dermbatch calibrate-masks``) and what ``run`` does with them."""

import csv
import json
import shutil

import numpy as np
import pytest

from dermbatch.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from dermbatch.cli.main import main
from dermbatch.errors import BundleError
from dermbatch.quality import FEATURES, QualityModel, mask_features
from tests.conftest import HAM, real_images
from trainer.quality import skin_view

F = {name: i for i, name in enumerate(FEATURES)}


def _disc(size=64, radius=14.0, centre=(32, 32), inside=6.0, outside=-6.0):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    return np.where(disc, inside, outside).astype(np.float32)


def test_features_of_a_confident_disc():
    f = mask_features(_disc(), 0.5)
    assert f[F["area_fraction"]] == pytest.approx(np.pi * 14 ** 2 / 64 ** 2, rel=0.05)
    assert f[F["mean_prob_inside"]] > 0.99 and f[F["mean_prob_outside"]] < 0.01
    assert f[F["solidity"]] > 0.95 and f[F["component_share"]] == 1.0 and f[F["border_fraction"]] == 0.0
    assert f[F["uncertain_ratio"]] == 0.0 and f[F["edge_contrast"]] == pytest.approx(6.0)


def test_features_see_doubt_fragments_and_the_border():
    rng = np.random.default_rng(0)
    vague = mask_features(_disc(inside=0.4, outside=-0.4) + rng.normal(0, 0.1, (64, 64)).astype(np.float32), 0.5)
    assert vague[F["uncertain_ratio"]] > 0.5 and vague[F["mean_abs_logit_inside"]] < 0.6
    two = np.maximum(_disc(radius=10, centre=(20, 20)), _disc(radius=8, centre=(48, 48)))
    split = mask_features(two, 0.5)
    assert 0.55 < split[F["component_share"]] < 0.7  # the kept component's share of all foreground
    edge = mask_features(_disc(radius=20, centre=(32, 5)), 0.5)
    assert edge[F["border_fraction"]] > 0.1
    empty = mask_features(np.full((64, 64), -5, np.float32), 0.5)
    assert empty[F["area_fraction"]] == 0 and empty[F["solidity"]] == 0 and empty[F["mean_prob_inside"]] == 0


def _model(n=len(FEATURES)):
    rng = np.random.default_rng(1)
    return QualityModel(FEATURES, rng.normal(size=n), rng.uniform(0.5, 2, n),
                        {"reliable": (rng.normal(size=n), 0.3), "lesion": (rng.normal(size=n), -0.2)},
                        {"reliable": 0.5, "lesion": 0.2})


def test_quality_model_round_trips_through_the_manifest_and_computes_logistic_probabilities():
    model = _model()
    again = QualityModel.from_manifest(json.loads(json.dumps(model.to_manifest())))
    x = np.random.default_rng(2).normal(size=(3, len(FEATURES)))
    for name, (coef, intercept) in model.weights.items():
        expected = 1 / (1 + np.exp(-(((x - model.mean) / model.scale) @ coef + intercept)))
        np.testing.assert_allclose(again.probabilities(x)[name], expected, rtol=1e-12)
    assert again.thresholds == model.thresholds


def _bundle_with_quality(tmp_path, tiny_bundle, quality):
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, root)
    manifest = json.loads((root / "bundle.json").read_text())
    manifest["segmentation"]["quality"] = quality
    (root / "bundle.json").write_text(json.dumps(manifest))
    return root


def test_a_bundle_with_a_bad_quality_section_is_refused_naming_the_field(tiny_bundle, tmp_path):
    section = _model().to_manifest()
    section["features"] = section["features"][:-1]
    with pytest.raises(BundleError, match=r"bundle.json: segmentation.quality: .*refit it"):
        load_bundle(_bundle_with_quality(tmp_path, tiny_bundle, section))
    section = _model().to_manifest()
    section["lesion"]["threshold"] = 1.5
    with pytest.raises(BundleError, match="lesion.threshold must be strictly between 0 and 1"):
        load_bundle(_bundle_with_quality(tmp_path / "2", tiny_bundle, section))


def test_run_drops_the_mask_when_the_lesion_model_says_no_lesion(tiny_bundle, image_folder, tmp_path):
    """A lesion model that rejects everything (intercept -50): every mask is dropped and the whole image is
    classified; a mask model that trusts everything (+50) gives mask_quality 1."""
    model = _model()
    zero = np.zeros(len(FEATURES))
    section = QualityModel(FEATURES, model.mean, model.scale, {"reliable": (zero, 50.0), "lesion": (zero, -50.0)},
                           {"reliable": 0.5, "lesion": 0.5}).to_manifest()
    root = _bundle_with_quality(tmp_path, tiny_bundle, section)
    out = tmp_path / "r.csv"
    assert main(["run", str(image_folder), "--out", str(out), "--model", str(root), "--masks", str(tmp_path / "m"),
                 "--tta", "none", "-q"]) == 0
    details = list(csv.DictReader(open(tmp_path / "r_details.csv")))
    assert details and all(d["lesion_found"] == "false" and d["bbox_w"] == "" and float(d["mask_quality"]) == 1.0
                           and float(d["lesion_probability"]) < 1e-9 for d in details)
    import cv2

    assert all(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).max() == 0 for p in (tmp_path / "m").iterdir())


def test_skin_view_stays_clear_of_the_lesion():
    rgb = np.zeros((150, 200, 3), np.uint8)
    rgb[..., 1] = 200  # green skin
    truth = np.zeros((150, 200), np.uint8)
    truth[60:100, 80:130] = 1
    rgb[truth > 0] = (255, 0, 0)  # a red lesion
    view = skin_view(rgb, truth, np.random.default_rng(0))
    assert view.shape == rgb.shape and view[..., 0].max() == 0
    truth[:] = 1
    assert skin_view(rgb, truth, np.random.default_rng(0)) is None


def test_calibrate_masks_on_real_images_separates_good_masks_and_skin(tmp_path):
    """A copy of the installed bundle calibrated on 100 HAM10000 images (unseen by its U-Net, trained on ISIC
    2018 Task 1): out of fold both models beat chance by far, and the card reports them."""
    real_images(HAM, 1)
    root = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    assert main(["calibrate-masks", "--model", str(root), "--images", str(HAM / "images"), "--masks",
                 str(HAM / "masks"), "--labels", str(HAM / "labels.csv"), "--limit", "100", "--seed", "3"]) == 0
    report = json.loads((root / "bundle.json").read_text())["segmentation"]["quality"]["report"]
    assert report["images"] == 100 and report["skin_views"] >= 10
    assert report["reliable"]["oof_auc"] > 0.75 and report["lesion"]["oof_auc"] > 0.9
    assert load_bundle(root).quality is not None
    assert "Mask quality (`mask_quality`" in (root / "README.md").read_text()


def test_calibrate_masks_refuses_too_few_examples(tmp_path, capsys):
    real_images(HAM, 1)
    root = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    code = main(["calibrate-masks", "--model", str(root), "--images", str(HAM / "images"), "--masks",
                 str(HAM / "masks"), "--limit", "12"])
    assert code == 2 and "give more images" in capsys.readouterr().err
