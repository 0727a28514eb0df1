"""``dermbatch train --tune-stages``: the pieces against independent computations, and a short real-data run whose
out-of-fold rows are the bundle's own output."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from dermbatch.bundle import CLASSES, ModelSpec
from dermbatch.cli.main import main
from dermbatch.errors import BundleError
from dermbatch.models import MultiStageClassifier, merge_low_rank
from tests.conftest import HAM, real_images
from trainer.tuned import D4_VIEWS, FLIP_VIEWS, PRIOR_GRID, LowRankConv, d4_view, inner_calibration


def test_merged_low_rank_update_equals_the_unmerged_module():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 20, 1, bias=False)
    module = LowRankConv(conv, rank=3, seed=1)
    with torch.no_grad():
        module.lora_b.normal_()
    x = torch.randn(2, 12, 5, 5)
    state = {"c.weight": conv.weight.detach(), "c.lora_a": module.lora_a.detach(), "c.lora_b": module.lora_b.detach()}
    merged = merge_low_rank(state)
    assert set(merged) == {"c.weight"}
    torch.testing.assert_close(torch.nn.functional.conv2d(x, merged["c.weight"]), module(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(BundleError, match="does not fit"):
        merge_low_rank({**state, "c.lora_b": torch.zeros(21, 3)})
    with pytest.raises(BundleError, match="lora_b without lora_a"):
        merge_low_rank({"c.weight": conv.weight, "c.lora_b": module.lora_b})


def test_features_from_any_stage_equal_the_whole_features():
    model = MultiStageClassifier("test_efficientnet", 7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model.features(x)
        for stage in range(1, len(model.backbone.blocks)):
            torch.testing.assert_close(model.features_from(*model.trunk(x, stage), stage), whole)


def test_cached_views_are_the_dihedral_group_and_flip_views_are_run_s_flip_tta():
    from dermbatch.tta import apply_view, views

    image = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    cached = {d4_view(image, k).tobytes() for k in range(D4_VIEWS)}
    assert len(cached) == 8  # all eight symmetries of the square
    flips = {d4_view(image, k).tobytes() for k in FLIP_VIEWS}
    chw = image.transpose(2, 0, 1)[None]
    expected = {np.ascontiguousarray(apply_view(chw, view)[0].transpose(1, 2, 0)).tobytes() for view in views("flip")}
    assert flips == expected


def _rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.realdata
def test_tuned_stages_train_beats_chance_and_its_oof_rows_are_the_bundles_output(tmp_path, monkeypatch):
    import trainer.tuned
    from dermbatch.bundle import load_bundle
    from dermbatch.models import load_fold_model
    from dermbatch.preprocess import normalize
    from dermbatch.tta import classify_with_tta, softmax
    from trainer.data import cls_items
    from trainer.dataset import TrainingSet
    from trainer.pretrained import lite_imagenet_state

    real_images(HAM, 1)
    rows = _rows(HAM / "labels.csv")
    picked = [r for r in rows if r["label"] == "VASC"][:50] + [r for r in rows if r["label"] == "NV"][:50]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    out, cache = tmp_path / "bundle", tmp_path / "cache"
    args = ["train", "--task", "cls", "--images", HAM / "images", "--labels", labels, "--masks", HAM / "masks",
            "--out", out, "--cache", cache, "--folds", "2", "--input-size", "64", "--tune-stages", "4",
            "--epochs", "2", "--batch-size", "16", "--jitter-views", "1", "--lr", "1e-4", "--backbone-lr-mult", "10",
            "--class-weights", "balanced", "--prior-correction", "--workers", "0", "-q"]
    assert main(list(map(str, args))) == 0
    metrics = json.loads((out / "metrics.json").read_text())["classification"]
    assert metrics["images"] == 100 and metrics["macro_auc"] > 0.7  # chance: 0.5 (two classes present)
    bundle = load_bundle(out)
    spec = bundle.classification
    assert spec.architecture == "timm-multistage" and spec.mean == (0.5, 0.5, 0.5)
    fold_keys = set(bundle.read_weights("classification", 0, shared=False))
    assert fold_keys and all(k.endswith((".lora_a", ".lora_b")) or k.startswith("classifier.")
                             or (".bn" in k and k.endswith((".weight", ".bias"))) for k in fold_keys)
    assert not any(k.startswith(("backbone.blocks.0.", "backbone.blocks.3.")) for k in fold_keys)  # frozen stages
    imagenet = lite_imagenet_state("tf_efficientnet_lite0")
    shared = bundle.read_shared("classification")
    assert torch.equal(shared["backbone.blocks.5.0.conv_pw.weight"], imagenet["blocks.5.0.conv_pw.weight"])
    held = {r["image"]: r for r in _rows(out / "oof" / "cls_fold1.csv")}
    items = [i for i in cls_items(HAM / "images", labels, HAM / "masks") if i.image_id in held][:6]
    crops = TrainingSet(items, "classification", spec, bundle.crop, cache, False, pre=bundle.preprocessing)
    model = load_fold_model(bundle, "classification", 1)
    merged = model.backbone.blocks[5][0].conv_pw.weight
    assert not torch.equal(merged, imagenet["blocks.5.0.conv_pw.weight"])  # the update is in the model that runs
    x = np.stack([normalize(crops.arrays(i)["crop"], spec) for i in range(len(items))])
    with torch.no_grad():
        probs = softmax(classify_with_tta(lambda b: model(torch.from_numpy(b)).numpy()[None], x, spec.tta))
    expected = np.array([[float(held[i.image_id][c]) for c in CLASSES] for i in items])
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    from dermbatch.backends.torch import TorchBackend
    backend = TorchBackend(bundle, "cpu", {"classification": (0, 1)})
    assert [m.stages for m in backend.models["classification"]] == [4]  # run: the frozen stages once for all folds
    tuned = json.loads((out / "bundle.json").read_text())["provenance"]["classification"]["tuned_stages"]
    assert set(tuned["prior_tau"]) == {"0", "1"} and all(t in PRIOR_GRID for t in tuned["prior_tau"].values())
    assert set(tuned["temperature"]) == {"0", "1"} and all(0.25 <= t <= 4 for t in tuned["temperature"].values())
    assert "logit adjustment" in (out / "README.md").read_text()
    # the held-out check is logged after the last epoch only; the inner model's is prior_correction's own pass
    assert [r["val_balanced_accuracy"] != "" for r in _rows(out / "logs" / "cls_fold0.csv")] == [False, True]
    assert [r["val_balanced_accuracy"] for r in _rows(out / "logs" / "cls_fold0_inner.csv")] == [""]

    # --resume: fold 1 again from its cached trunk, never recomputed
    monkeypatch.setattr(trainer.tuned, "training_views", lambda *a, **k: pytest.fail("trunk recomputed"))
    (out / "oof" / "cls_fold1.csv").unlink()
    manifest = json.loads((out / "bundle.json").read_text())
    manifest["classification"]["folds"] = [0]
    (out / "bundle.json").write_text(json.dumps(manifest))
    assert main(list(map(str, [*args, "--resume"]))) == 0
    assert [r["image"] for r in _rows(out / "oof" / "cls_fold1.csv")] == list(held)


def test_inner_calibration_softens_overconfidence_and_corrects_the_prior():
    rng = np.random.default_rng(0)
    labels = rng.choice(2, 4000, p=[0.9, 0.1])
    # logits 3x - 3 log 9 where the calibrated ones are 2x - log 9: overconfident, so T well above 1
    true_logit = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0) + np.log(0.1 / 0.9)
    z = np.stack([np.zeros_like(true_logit), 3 * true_logit], 1)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    temperature, tau, scores = inner_calibration(probs, labels, np.array([0.9, 0.1]))
    assert 2.2 < temperature < 4.0
    # the rare class needs the prior taken out for balanced accuracy: tau > 0 wins, and scores are per tau
    assert tau > 0 and set(scores) == set(PRIOR_GRID) and scores[tau] > scores[0.0] + 0.05


def test_tune_stages_is_refused_with_frozen_backbone_and_for_segmentation(tmp_path, capsys):
    assert main(["train", "--task", "seg", "--images", str(tmp_path), "--masks", str(tmp_path), "--out",
                 str(tmp_path / "b"), "--tune-stages", "4"]) == 2
    assert "--tune-stages fine-tunes a classifier" in capsys.readouterr().err
    assert main(["train", "--task", "cls", "--images", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--out",
                 str(tmp_path / "b"), "--tune-stages", "4", "--frozen-backbone"]) == 2
    assert "goes with none of" in capsys.readouterr().err


def test_merge_keeps_models_without_updates_unchanged():
    spec = ModelSpec("classification", "timm", "mobilenetv3_small_050", (64, 64), (0.5,) * 3, (0.5,) * 3, (0,))
    from dermbatch.models import random_state_dict

    state = random_state_dict(spec)
    assert merge_low_rank(state).keys() == state.keys()


@pytest.mark.realdata
def test_a_trunk_cache_of_the_first_images_is_extended_to_the_same_rows_a_fresh_one_has(tmp_path, monkeypatch):
    import trainer.tuned
    from dermbatch.bundle import IMAGENET_MEAN, IMAGENET_STD, CropSpec
    from trainer.data import cls_items
    from trainer.dataset import TrainingSet
    from trainer.tuned import cache_trunk

    real_images(HAM, 1)
    items = cls_items(HAM / "images", HAM / "labels.csv", HAM / "masks")[:5]
    spec = ModelSpec("classification", "timm-multistage", "test_efficientnet", (32, 32), IMAGENET_MEAN,
                     IMAGENET_STD, (0,))
    model = MultiStageClassifier("test_efficientnet", 7).eval()

    def cache(count, path):
        data = TrainingSet(items[:count], "classification", spec, CropSpec(), tmp_path / "crops", False)
        trunk, stats, _ = cache_trunk(model, spec, data, 2, 2, 0, path)
        return np.asarray(trunk), stats

    fresh = cache(5, tmp_path / "fresh" / "trunk.npy")
    cache(3, tmp_path / "first" / "trunk.npy")
    (tmp_path / "grown").mkdir()
    for name in ("trunk.npy", "trunk_stats.npy", "trunk.json"):  # a run started from another run's cache
        (tmp_path / "grown" / name).hardlink_to(tmp_path / "first" / name)
    computed = []
    real_views = trainer.tuned.training_views
    monkeypatch.setattr(trainer.tuned, "training_views", lambda a, *r: computed.append(a) or real_views(a, *r))
    grown = cache(5, tmp_path / "grown" / "trunk.npy")
    assert len(computed) == 2  # only the two new images went through the trunk
    first_key = json.loads(json.loads((tmp_path / "first" / "trunk.json").read_text())["key"])
    assert len(np.load(tmp_path / "first" / "trunk_stats.npy")) == 3 and len(first_key["ids"]) == 3  # untouched
    np.testing.assert_array_equal(grown[0], fresh[0])
    np.testing.assert_array_equal(grown[1], fresh[1])
    computed.clear()
    cache(4, tmp_path / "grown" / "trunk.npy")  # not an extension of the five: computed afresh
    assert len(computed) == 4


def test_trunk_cache_made_by_worker_processes_equals_the_one_made_in_process(tmp_path):
    from dermbatch.bundle import IMAGENET_MEAN, IMAGENET_STD, CropSpec
    from trainer.data import cls_items
    from trainer.dataset import TrainingSet
    from trainer.tuned import cache_trunk

    real_images(HAM, 1)
    items = cls_items(HAM / "images", HAM / "labels.csv", HAM / "masks")[:6]
    spec = ModelSpec("classification", "timm-multistage", "test_efficientnet", (32, 32), IMAGENET_MEAN,
                     IMAGENET_STD, (0,))
    model = MultiStageClassifier("test_efficientnet", 7).eval()
    data = TrainingSet(items, "classification", spec, CropSpec(), tmp_path / "crops", False)
    alone = [np.asarray(a) for a in cache_trunk(model, spec, data, 2, 3, 0, tmp_path / "alone" / "t.npy")[:2]]
    pooled = [np.asarray(a) for a in cache_trunk(model, spec, data, 2, 3, 0, tmp_path / "pool" / "t.npy",
                                                 workers=2)[:2]]
    assert alone[0].shape[:2] == (6, 8 + 3) and np.abs(alone[0]).max() > 0
    np.testing.assert_array_equal(pooled[0], alone[0])
    np.testing.assert_array_equal(pooled[1], alone[1])
