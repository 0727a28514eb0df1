"""Short k-fold trainings on real data: a bundle `dermbatch run` consumes, grouped splits, exact resume."""

import json

import pytest
import torch

import trainer.fit
from dermbatch.cli.main import main
from tests.conftest import HAM, ISIC_SEG, real_images
from trainer.run import plan_tasks
from trainer.train import train_task

pytestmark = pytest.mark.realdata


def _train(*args):
    return main(["train", "--folds", "2", "--epochs", "1", "--input-size", "64", "--batch-size", "8",
                 "--workers", "0", "-q", *map(str, args)])


def test_seg_then_cls_training_makes_a_bundle_that_run_consumes(tmp_path):
    real_images(ISIC_SEG, 1), real_images(HAM, 1)
    out, cache = tmp_path / "bundle", tmp_path / "cache"
    assert _train("--task", "seg", "--images", ISIC_SEG / "images", "--masks", ISIC_SEG / "masks",
                  "--limit", "24", "--out", out, "--cache", cache) == 0
    assert _train("--task", "cls", "--images", HAM / "images", "--labels", HAM / "labels.csv",
                  "--masks", HAM / "masks", "--limit", "60", "--out", out, "--cache", cache) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["segmentation"]["folds"] == [0, 1] and manifest["classification"]["folds"] == [0, 1]
    assert manifest["provenance"]["classification"]["pretrained"] == "imagenet"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["segmentation"]["images"] == 24 and 0 <= metrics["segmentation"]["thresholded_jaccard"] <= 1
    assert metrics["classification"]["images"] >= 60
    assert "balanced_accuracy" in metrics["classification"] and "ece" in metrics["classification"]
    card = (out / "README.md").read_text()
    assert "not a medical device" in card and "CC BY-NC" in card and "balanced accuracy" in card
    splits = json.loads((out / "splits.json").read_text())["classification"]
    assert splits["grouped_by"] == "lesion_id" and splits["stratified"]
    images = real_images(HAM, 3)
    assert main(["run", *map(str, images), "--out", str(tmp_path / "r.csv"), "--model", str(out), "-q"]) == 0
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 4


def _plan(out, cache, epochs=2):
    fit = dict(epochs=epochs, batch_size=8, lr=1e-3, schedule="cosine", backbone_lr_mult=0.1, head_warmup_epochs=0,
               sgdr_cycle_epochs=0, patience=0, balanced_sampling=False, seed=3, workers=0, device="cpu")
    (plan,) = plan_tasks("classification", out=out, data=HAM, images=HAM / "images", masks=HAM / "masks",
                         labels=HAM / "labels.csv", limit=40, cache=cache, resume=False, fit=fit, folds=2,
                         input_size=48, encoder="mobilenetv3_small_050", pretrained="none", tta="none",
                         class_weights="balanced", focal_gamma=0.0, label_smoothing=0.0)
    return plan


def test_interrupted_training_resumes_to_the_same_result(tmp_path, monkeypatch):
    real_images(HAM, 1)
    cache = tmp_path / "cache"
    uninterrupted = train_task(_plan(tmp_path / "a", cache))

    original, calls = trainer.fit._save_checkpoint, []

    def save_then_die(*args):
        original(*args)
        calls.append(1)
        if len(calls) == 3:  # fold 0 finished (2 epochs), fold 1 after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.fit, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_task(_plan(tmp_path / "b", cache))
    monkeypatch.setattr(trainer.fit, "_save_checkpoint", original)
    plan = _plan(tmp_path / "b", cache)
    plan.resume = True
    resumed = train_task(plan)
    assert resumed["balanced_accuracy"] == uninterrupted["balanced_accuracy"]
    assert resumed["per_class"] == uninterrupted["per_class"]
    logs = (tmp_path / "b" / "logs" / "cls_fold1.csv").read_text().splitlines()
    assert len(logs) == 3  # header + epoch 1 (before the interruption) + epoch 2 (after resuming)
    reference = (tmp_path / "a" / "logs" / "cls_fold1.csv").read_text().splitlines()
    untimed = [line.split(",")[:-2] for line in logs]  # the last two columns are seconds and images/s
    assert untimed == [line.split(",")[:-2] for line in reference]


def test_official_isic_layout_trains_both_and_crops_with_the_trained_segmenter(tmp_path):
    import pandas as pd

    real_images(ISIC_SEG, 1), real_images(HAM, 1)
    data = tmp_path / "data"
    for name in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth",
                 "ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth"):
        (data / name).mkdir(parents=True)
    for image in real_images(ISIC_SEG, 16):
        (data / "ISIC2018_Task1-2_Training_Input" / image.name).symlink_to(image)
        mask = f"{image.stem}_segmentation.png"
        (data / "ISIC2018_Task1_Training_GroundTruth" / mask).symlink_to(ISIC_SEG / "masks" / mask)
    labels = pd.read_csv(HAM / "labels.csv")
    labels = labels.groupby("label").head(4)  # a few of every class
    for image_id in labels["image_id"]:
        (data / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg").symlink_to(HAM / "images" / f"{image_id}.jpg")
    columns = ["image_id", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    onehot = labels[columns].rename(columns={"image_id": "image"})
    onehot.to_csv(data / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
                  index=False)
    labels[["image_id", "lesion_id"]].rename(columns={"image_id": "image"}).to_csv(
        data / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    out, cache = tmp_path / "bundle", tmp_path / "cache"
    assert _train("--data", data, "--out", out, "--cache", cache, "--encoder", "mobilenetv3_small_050",
                  "--pretrained", "none") == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["segmentation"]["encoder"] == "tu-mobilenetv3_small_050"
    assert manifest["classification"]["folds"] == [0, 1]
    predicted = list(cache.glob("predicted-masks-*/*.png"))
    assert len(predicted) == len(labels)  # every Task 3 image was cropped with a predicted mask
    assert json.loads((out / "splits.json").read_text())["classification"]["grouped_by"] == "lesion_id"


def test_warm_start_begins_each_fold_from_the_same_fold_and_refuses_another_split(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import trainer.train
    from dermbatch.errors import UsageError

    real_images(HAM, 1)
    cache = tmp_path / "cache"
    first = train_task(_plan(tmp_path / "a", cache, epochs=1))
    starts, original = {}, trainer.train.fit_fold

    def record_start(model, spec, train_set, val_set, loss, cfg, fold, *rest):
        starts[fold] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(model, spec, train_set, val_set, loss, cfg, fold, *rest)

    monkeypatch.setattr(trainer.train, "fit_fold", record_start)
    plan = _plan(tmp_path / "b", cache, epochs=1)
    plan.warm_start = tmp_path / "a"
    metrics = train_task(plan)
    assert sorted(starts) == [0, 1] and metrics["images"] == first["images"]
    for fold, state in starts.items():
        source = load_file(str(tmp_path / "a" / f"cls_fold{fold}.safetensors"))
        assert all(torch.equal(state[k], source[k]) for k in source)
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["provenance"]["classification"]["warm_start"]

    other = _plan(tmp_path / "c", cache, epochs=1)
    other.fit.seed = 4  # another seed: another split, so fold k of "a" has seen fold k's images here
    other.warm_start = tmp_path / "a"
    with pytest.raises(UsageError, match="split differs"):
        train_task(other)


def test_frozen_backbone_fits_linear_heads_whose_oof_equals_the_bundle_with_tta(tmp_path, monkeypatch):
    import numpy as np

    import trainer.frozen
    from dermbatch.bundle import CLASSES, load_bundle
    from dermbatch.models import load_fold_model
    from dermbatch.preprocess import normalize
    from dermbatch.tta import classify_with_tta, softmax
    from trainer.data import cls_items
    from trainer.dataset import TrainingSet
    from trainer.pretrained import lite_imagenet_state
    from trainer.run import subset

    real_images(HAM, 1)
    out, cache = tmp_path / "bundle", tmp_path / "cache"
    args = ["--task", "cls", "--images", HAM / "images", "--labels", HAM / "labels.csv", "--masks", HAM / "masks",
            "--limit", "70", "--out", out, "--cache", cache, "--frozen-backbone", "--class-weights", "balanced"]
    assert _train(*args) == 0
    bundle = load_bundle(out)
    spec = bundle.classification
    assert spec.architecture == "timm-multistage" and spec.mean == (0.5, 0.5, 0.5)  # the Lite weights' input
    assert sorted(p.name for p in out.glob("cls_*.safetensors")) == [
        "cls_fold0.safetensors", "cls_fold1.safetensors", "cls_shared.safetensors"]
    imagenet = lite_imagenet_state("tf_efficientnet_lite0")
    shared = bundle.read_shared("classification")
    assert torch.equal(shared["backbone.blocks.3.0.conv_pw.weight"], imagenet["blocks.3.0.conv_pw.weight"])
    rows = [r for k in (0, 1) for r in csv_rows(out / "oof" / f"cls_fold{k}.csv")]
    held = {r["image"]: r for r in rows if r["fold"] == "1"}
    items = [i for i in subset(cls_items(HAM / "images", HAM / "labels.csv", HAM / "masks"), 70, 0)
             if i.image_id in held][:6]
    crops = TrainingSet(items, "classification", spec, bundle.crop, cache, False, pre=bundle.preprocessing)
    model = load_fold_model(bundle, "classification", 1)
    x = np.stack([normalize(crops.arrays(i)["crop"], spec) for i in range(len(items))])
    with torch.no_grad():
        probs = softmax(classify_with_tta(lambda b: model(torch.from_numpy(b)).numpy()[None], x, spec.tta))
    expected = np.array([[float(held[i.image_id][c]) for c in CLASSES] for i in items])
    np.testing.assert_allclose(probs, expected, atol=2e-5)  # the held-out fold's OOF rows are the bundle's output
    metrics = json.loads((out / "metrics.json").read_text())["classification"]
    provenance = json.loads((out / "bundle.json").read_text())["provenance"]["classification"]
    assert metrics["images"] == len(rows) and set(provenance["frozen_backbone"]["chosen_c"]) == {"0", "1"}
    assert "backbone frozen at its imagenet weights" in (out / "README.md").read_text()

    monkeypatch.setattr(trainer.frozen, "extract_features", lambda *a, **k: pytest.fail("features recomputed"))
    (out / "oof" / "cls_fold1.csv").unlink()
    _edit = json.loads((out / "bundle.json").read_text())
    _edit["classification"]["folds"] = [0]
    (out / "bundle.json").write_text(json.dumps(_edit))
    assert _train(*args, "--resume") == 0  # fold 1 again, from the cached features
    assert [r["image"] for r in csv_rows(out / "oof" / "cls_fold1.csv")] == list(held)


def test_frozen_backbone_refuses_segmentation_and_warm_start(tmp_path, capsys):
    assert _train("--task", "seg", "--images", tmp_path, "--masks", tmp_path, "--out", tmp_path / "b",
                  "--frozen-backbone") == 2
    assert "--frozen-backbone trains a classifier" in capsys.readouterr().err


def csv_rows(path):
    import csv

    return list(csv.DictReader(open(path)))


def test_fit_linear_gives_sklearns_probabilities_on_raw_features_also_with_two_classes():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from dermbatch.tta import softmax
    from trainer.frozen import fit_linear

    rng = np.random.default_rng(0)
    for classes in ((0, 1, 4), (2, 5)):
        y = np.array([classes[i % len(classes)] for i in range(60)])
        x = rng.normal(size=(60, 5)) * 3 + 10 + y[:, None]  # off-centre, unscaled: the scaler is folded in
        weight, bias, c = fit_linear(x, y, [str(i) for i in range(60)], "balanced", 0, grid=(0.5,))
        scaler = StandardScaler().fit(x)
        weights = {k: 60 / (7 * np.sum(y == k)) for k in classes}  # dermbatch's "balanced": n / (7 * count)
        reference = LogisticRegression(C=0.5, class_weight=weights, max_iter=5000).fit(scaler.transform(x), y)
        probs = softmax(x @ weight.T + bias)
        np.testing.assert_allclose(probs[:, list(classes)], reference.predict_proba(scaler.transform(x)), atol=1e-4)
        assert probs[:, [k for k in range(7) if k not in classes]].max() < 1e-10 and c == 0.5
