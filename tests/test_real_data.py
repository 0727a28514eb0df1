"""``dermbatch run`` on real dermoscopic images from ../shared/data, scored by the official ISIC scorer.

The bundle is randomly initialised, so the scores themselves are meaningless here; what is tested is that
real JPEGs go through every stage and that the official scorer accepts our CSV and masks unchanged.
"""

import shutil

import numpy as np
import pandas as pd
import pytest

from dermbatch.bundle import CLASSES
from dermbatch.cli.main import main
from dermbatch.predictor import Predictor
from tests.conftest import HAM, ISIC_SEG, real_images

pytestmark = pytest.mark.realdata


def test_official_segmentation_scorer_accepts_our_masks(tiny_bundle, tmp_path):
    from isic_challenge_scoring.segmentation import SegmentationScore

    images = real_images(ISIC_SEG, 6)
    (tmp_path / "in").mkdir(), (tmp_path / "truth").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).symlink_to(image)
        shutil.copy(ISIC_SEG / "masks" / f"{image.stem}_segmentation.png", tmp_path / "truth")
    code = main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle.path),
                 "--masks", str(tmp_path / "pred"), "-q"])
    assert code == 0
    score = SegmentationScore.from_dir(tmp_path / "truth", tmp_path / "pred")
    assert 0.0 <= score.macro_average["jaccard"] <= 1.0
    assert len(list((tmp_path / "pred").iterdir())) == 6


def test_official_classification_scorer_accepts_our_csv(tiny_bundle, tmp_path):
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    real_images(HAM, 1)  # skips without the data
    labels = pd.read_csv(HAM / "labels.csv").set_index("image_id")
    # two images of every class: the scorer's per-class metrics need positives of each
    images = [HAM / "images" / f"{i}.jpg" for c in CLASSES for i in labels.index[labels["label"] == c][:2]]
    truth = labels.loc[[p.stem for p in images], list(CLASSES)].rename_axis("image")
    truth.to_csv(tmp_path / "truth.csv")
    code = main(["run", *map(str, images), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle.path),
                 "--tta", "d4", "-q"])
    assert code == 0
    score = ClassificationScore.from_file(tmp_path / "truth.csv", tmp_path / "r.csv",
                                          ClassificationMetric.BALANCED_ACCURACY)
    assert 0.0 <= score.overall <= 1.0


def test_predictor_api_on_real_images_streams_results_in_order(tiny_bundle):
    images = real_images(HAM, 5)
    with Predictor(tiny_bundle.path, tta="flip", batch_size=2, workers=2) as predictor:
        results = list(predictor.predict(images))
    assert [r.image_id for r in results] == [p.stem for p in images]
    for r in results:
        assert r.ok and r.original_size == (150, 200)
        assert r.probabilities.shape == (7,) and abs(r.probabilities.sum() - 1) < 1e-6
        assert r.full_size_mask().shape == (150, 200)


def test_folds_and_tta_selection_change_the_ensemble(tiny_bundle):
    image = real_images(HAM, 1)
    def probs(**kwargs):
        with Predictor(tiny_bundle.path, workers=0, **kwargs) as predictor:
            return next(predictor.predict(image)).probabilities
    both, fold0, fold1 = probs(tta="none"), probs(tta="none", folds="0"), probs(tta="none", folds="1")
    assert not np.allclose(fold0, fold1)
    assert not np.allclose(probs(tta="flip"), both)
