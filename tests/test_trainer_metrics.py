import numpy as np
import pytest

from trainer.losses import BceDiceLoss, ClassificationLoss, class_weights
from trainer.metrics import classification_metrics, jaccard, segmentation_metrics
from trainer.optim import lr_factor


def test_thresholded_jaccard_zeroes_images_below_065():
    m = segmentation_metrics([0.9, 0.6, 0.7])
    assert m["jaccard"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert m["thresholded_jaccard"] == pytest.approx((0.9 + 0.0 + 0.7) / 3)
    assert m["dice"] == pytest.approx(np.mean([2 * j / (1 + j) for j in (0.9, 0.6, 0.7)]))


def test_jaccard_by_hand():
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[:2], b[1:3] = 1, 1
    assert jaccard(a, b) == pytest.approx(4 / 12)
    assert jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_balanced_accuracy_is_mean_recall_and_confusions_are_counted():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6])
    predicted = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 3, 4, 5, 6])
    probs = np.eye(7)[predicted] * 0.9 + 0.1 / 7
    m = classification_metrics(probs, labels)
    recalls = [0.5, 1.0, 0.75, 1, 1, 1, 1]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["per_class"]["MEL"]["recall"] == pytest.approx(0.5)
    assert m["most_confused"][0] == {"truth": "MEL", "predicted": "NV", "count": 2}
    assert m["accuracy"] == pytest.approx(11 / 14)


def test_class_weights():
    w = class_weights([0, 0, 0, 1], 2, "balanced")
    assert w.tolist() == pytest.approx([4 / 6, 4 / 2])
    assert class_weights([0, 0, 0, 1], 2, "balanced-sqrt").tolist() == pytest.approx(np.sqrt([4 / 6, 2]).tolist())


def test_losses_decrease_towards_the_target():
    import torch
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    loss = BceDiceLoss()
    assert loss(target * 20 - 10, target) < loss(torch.zeros_like(target), target)
    ce = ClassificationLoss(focal_gamma=2.0)
    good, bad = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert ce(good, torch.tensor([0])) < ce(bad, torch.tensor([0]))


@pytest.mark.parametrize("schedule", ["cosine", "sgdr", "onecycle"])
def test_schedules_stay_in_range_and_end_low(schedule):
    factors = [lr_factor(schedule, s, 100, warmup=5, cycle=10) for s in range(100)]
    assert all(0 <= f <= 1.0 + 1e-9 for f in factors)
    assert max(factors) > 0.9
    if schedule != "sgdr":  # a warm-restart schedule may end mid-cycle
        assert factors[-1] < 0.05


def test_sgdr_restarts_with_growing_cycles():
    factors = [lr_factor("sgdr", s, 70, cycle=10, cycle_mult=2) for s in range(70)]
    restarts = [s for s in range(1, 70) if factors[s] > factors[s - 1] + 0.5]
    assert restarts == [10, 30]


def test_balanced_accuracy_equals_sklearns_without_its_warning():
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from trainer.metrics import classification_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 200)  # classes 5 and 6 never in the truth, but predicted
    probs = rng.dirichlet(np.ones(7), 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(labels, probs.argmax(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classification_metrics(probs, labels)["balanced_accuracy"] == pytest.approx(expected)
