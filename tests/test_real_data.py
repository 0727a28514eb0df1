"""The Python API on real dermoscopic images from ../shared/data (randomly initialised bundle).

That the official scorer accepts our CSV and masks unchanged, with equal numbers, is in test_evaluate.py.
"""


import numpy as np
import pytest

from dermbatch.predictor import Predictor
from tests.conftest import HAM, real_images

pytestmark = pytest.mark.realdata


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
