"""``dermbatch train --task cls --frozen-backbone``: k-fold linear classifiers on frozen ImageNet features.

The backbone keeps its pretrained weights and is stored once in the bundle (``cls_shared.safetensors``);
each fold learns only the ``timm-multistage`` classifier, a multinomial logistic regression on the channel
means and standard deviations of every stage and of the head convolution, with its L2 strength chosen by a
grouped, stratified inner cross-validation on the fold's own training images (never on its held-out fold).

Features are extracted once per image from the exact crop ``dermbatch run`` makes, averaged over the
bundle's TTA views: the pipeline averages logits over views, and through a linear classifier that equals
the classifier of the averaged features. They are cached in ``checkpoints/`` so ``--resume`` skips the
extraction. On a CPU this trains every fold in minutes, where fine-tuning the whole network takes hours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dermbatch.bundle import CLASSES, ModelSpec, save_weights
from dermbatch.preprocess import normalize
from dermbatch.tta import softmax, stack_views
from trainer.dataset import TrainingSet
from trainer.losses import class_weights
from trainer.metrics import classification_metrics
from trainer.oof import write_rows
from trainer.task import existing_manifest, new_model, update_manifest

log = logging.getLogger(__name__)
C_GRID = (3e-4, 1e-3, 3e-3)  # inverse L2 strengths tried by the inner cross-validation
INNER_FOLDS = 3
ABSENT_LOGIT = -30.0  # bias of a class with no training image in a fold: never predicted


@torch.no_grad()
def extract_features(model, spec: ModelSpec, dataset: TrainingSet, device: str, batch: int = 32,
                     progress=None) -> np.ndarray:
    """(N, D) pooled features of every item's exact crop, averaged over ``spec.tta``'s views."""
    model.eval().to(device)
    task_id = progress.add_task("classification: frozen features", total=len(dataset)) if progress else None
    parts = []
    for start in range(0, len(dataset), batch):
        indices = range(start, min(len(dataset), start + batch))
        x = np.stack([normalize(dataset.arrays(i)["crop"], spec) for i in indices])
        views, stacked = stack_views(x, spec.tta)
        feats = model.features(torch.from_numpy(stacked).to(device)).float().cpu().numpy()
        parts.append(feats.reshape(len(views), len(x), -1).mean(axis=0))
        if progress:
            progress.update(task_id, advance=len(x))
    if progress:
        progress.remove_task(task_id)
    return np.concatenate(parts)


def cached_features(path: Path, key: dict, ids: list[str], compute) -> tuple[np.ndarray, float]:
    """(features, images/s of their extraction): from ``path`` when they were made with ``key`` for exactly
    ``ids``, else from ``compute()`` (then saved there)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if path.exists():
        with np.load(path) as saved:
            if str(saved["key"]) == digest and saved["ids"].tolist() == ids:
                log.info("classification: reusing the frozen features in %s", path)
                return saved["features"], float(saved["images_per_s"])
    start = time.perf_counter()
    features = compute()
    speed = len(ids) / (time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, key=digest, ids=np.array(ids), features=features, images_per_s=speed)
    tmp.replace(path)
    return features, speed


def class_logits(clf) -> tuple[np.ndarray, np.ndarray]:
    """A fitted sklearn ``LogisticRegression`` as (weight (K, D), bias (K,)) over all ``CLASSES``: sklearn's binary
    form (one logit d) becomes two softmax logits (-d/2, d/2); a class absent from its training labels gets a
    zero weight and the bias ``ABSENT_LOGIT`` (never predicted)."""
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:
        coef, intercept = np.vstack([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    weight = np.zeros((len(CLASSES), coef.shape[1]))
    bias = np.full(len(CLASSES), ABSENT_LOGIT)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    return weight, bias


def fit_linear(x: np.ndarray, y: np.ndarray, groups: list[str], weight_mode: str, seed: int,
               grid=C_GRID) -> tuple[np.ndarray, np.ndarray, float]:
    """A class-weighted multinomial logistic regression on standardised ``x``, its C chosen by grouped inner
    cross-validation (balanced accuracy); returned as (weight (K, D), bias (K,)) on the raw features."""
    from sklearn.model_selection import StratifiedGroupKFold

    def fit(rows, c):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x[rows])
        weights = class_weights(y[rows].tolist(), len(CLASSES), weight_mode).tolist()
        clf = LogisticRegression(C=c, class_weight=dict(enumerate(weights)), max_iter=5000)
        clf.fit(scaler.transform(x[rows]), y[rows])
        coef, intercept = class_logits(clf)
        weight = coef / scaler.scale_
        return weight, intercept - weight @ scaler.mean_

    def inner_score(c):
        splitter = StratifiedGroupKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=seed)
        probs = np.zeros((len(y), len(CLASSES)))
        for train, held in splitter.split(x, y, groups):
            weight, bias = fit(train, c)
            probs[held] = softmax(x[held] @ weight.T + bias)
        return classification_metrics(probs, y)["balanced_accuracy"]

    everything = np.arange(len(y))
    if len(grid) == 1 or len(set(groups)) < 2 * INNER_FOLDS:
        best = grid[len(grid) // 2]
    else:
        scores = {c: inner_score(c) for c in grid}
        best = max(scores, key=scores.get)
        log.info("classification: inner balanced accuracy by C %s -> C=%g",
                 {f"{c:g}": round(s, 4) for c, s in scores.items()}, best)
    weight, bias = fit(everything, best)
    return weight.astype(np.float32), bias.astype(np.float32), best


def train_frozen(opts, spec: ModelSpec, fold_of: dict[str, int], done: list[int], weights: dict,
                 provenance: dict, cache: Path, progress=None) -> None:
    """Every fold not in ``done``: fit its classifier, save it and its out-of-fold predictions."""
    model = new_model(opts, spec, 0)  # the pretrained backbone; every fold shares it
    dataset = TrainingSet(opts.items, opts.task, spec, opts.crop, cache, False, opts.fit.seed, opts.preprocessing)
    ids = [i.image_id for i in opts.items]
    key = {"spec": asdict(spec) | {"folds": None}, "crop": asdict(opts.crop), "pre": asdict(opts.preprocessing),
           "backbone": _tensor_digest(model.backbone.state_dict())}
    features, speed = cached_features(opts.out / "checkpoints" / "cls_features.npz", key, ids,
                                      lambda: extract_features(model, spec, dataset, opts.fit.device,
                                                               progress=progress))
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    name, digest = save_weights(opts.out, opts.task, None, shared)
    weights[name] = digest
    labels = np.array([i.label for i in opts.items])
    groups = [i.group or i.image_id for i in opts.items]
    folds = np.array([fold_of[i] for i in ids])
    earlier = ((existing_manifest(opts.out) or {}).get("provenance", {}).get("classification", {})
               .get("frozen_backbone") or {}) if done else {}
    frozen = provenance["frozen_backbone"] = {"c_grid": list(C_GRID), "inner_folds": INNER_FOLDS,
                                              "chosen_c": {k: c for k, c in earlier.get("chosen_c", {}).items()
                                                           if int(k) in done}}
    for fold in range(opts.folds):
        if fold in done:
            continue
        train, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        weight, bias, c = fit_linear(features[train], labels[train], [groups[i] for i in train],
                                     opts.class_weights, opts.fit.seed)
        probs = softmax(features[held].astype(np.float64) @ weight.T + bias)
        write_rows(opts.out / "oof" / f"cls_fold{fold}.csv",
                   [{"image": ids[i], "label": CLASSES[labels[i]], **dict(zip(CLASSES, map(float, p), strict=True))}
                    for i, p in zip(held, probs, strict=True)], fold)
        score = classification_metrics(probs, labels[held])
        _log_fold(opts.out / "logs" / f"cls_fold{fold}.csv", score, c, speed)
        name, digest = save_weights(opts.out, opts.task, fold, {"classifier.weight": torch.from_numpy(weight),
                                                                "classifier.bias": torch.from_numpy(bias)})
        weights[name] = digest
        done.append(fold)
        frozen["chosen_c"][str(fold)] = c
        update_manifest(opts, spec, done, weights, provenance)
        log.info("classification fold %d: C=%g, held-out balanced accuracy %.4f, macro AUC %.4f", fold, c,
                 score["balanced_accuracy"], score["macro_auc"])


def _tensor_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _log_fold(path: Path, score: dict, c: float, images_per_s: float) -> None:
    from trainer.fit import _append_csv

    path.unlink(missing_ok=True)
    _append_csv(path, {"epoch": 1, "c": c, "val_balanced_accuracy": score["balanced_accuracy"],
                       "val_accuracy": score["accuracy"], "val_macro_auc": score["macro_auc"],
                       "train_images_per_s": images_per_s})
