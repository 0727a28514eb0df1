"""Fit a bundle's mask-quality models (``dermbatch calibrate-masks``) on images with expert masks.

For every image the bundle's own segmentation runs exactly as in ``run`` (folds, TTA, threshold, largest
component); ``dermbatch.quality.mask_features`` describes the result. Lesion-free views of real skin come from
the same images: the largest rectangle of the image's aspect that stays clear of the (dilated) expert mask,
resized to the image's size. Two logistic regressions are fitted, each with its L2 strength chosen by a
lesion-grouped inner cross-validation (log loss), and scored out of fold:

- ``reliable``: the mask's Jaccard against the expert's is at least 0.65 (skin views: never);
- ``lesion``: the image shows a lesion (skin views: no). Its decision threshold keeps at most
  ``--max-missed`` of the real lesions out of fold (a missed lesion costs more than a phantom one).

Only images whose segmentation found something take part: without a mask there is nothing to judge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermbatch.postprocess import mask_from_logits
from dermbatch.preprocess import model_input
from dermbatch.quality import FEATURES, QualityModel, mask_features
from dermbatch.tta import segment_with_tta
from trainer.metrics import ISIC_JACCARD_THRESHOLD, jaccard

log = logging.getLogger(__name__)

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MIN_EXAMPLES = 20  # of each outcome, for a 5-fold inner cross-validation


@dataclass
class Samples:
    features: np.ndarray  # (N, len(FEATURES))
    jaccard: np.ndarray  # (N,) against the expert mask; 0 for skin views
    lesion: np.ndarray  # (N,) bool: a real image (True) or a lesion-free skin view (False)
    groups: np.ndarray  # (N,) lesion id (a skin view shares its source image's)
    found: np.ndarray  # (N,) bool: the segmentation found something


def skin_view(rgb: np.ndarray, truth: np.ndarray, rng: np.random.Generator,
              min_fraction: float = 1 / 3) -> np.ndarray | None:
    """The largest window of ``rgb``'s aspect whose sides are a fraction ≥ ``min_fraction`` of the image's and
    that stays clear of ``truth`` dilated by 5 % of the shorter side, resized to ``rgb``'s size; None if none."""
    height, width = truth.shape
    pad = max(1, round(0.05 * min(height, width)))
    blocked = cv2.dilate((truth > 0).astype(np.uint8), np.ones((2 * pad + 1, 2 * pad + 1), np.uint8))
    integral = cv2.integral(blocked)
    for fraction in np.linspace(0.7, min_fraction, 8):
        h, w = max(8, round(height * fraction)), max(8, round(width * fraction))
        ys, xs = np.arange(0, height - h + 1), np.arange(0, width - w + 1)
        sums = (integral[ys[:, None] + h, xs[None] + w] - integral[ys[:, None], xs[None] + w]
                - integral[ys[:, None] + h, xs[None]] + integral[ys[:, None], xs[None]])
        free = np.argwhere(sums == 0)
        if len(free):
            y, x = free[rng.integers(len(free))]
            return cv2.resize(rgb[ys[y]:ys[y] + h, xs[x]:xs[x] + w], (width, height), interpolation=cv2.INTER_LINEAR)
    return None


def collect(predictor, items: list[tuple[str, Path, Path, str]], seed: int = 0, batch_size: int = 16,
            progress=None) -> Samples:
    """Features, Jaccard and labels for ``items`` = (image id, image path, expert mask path, lesion group),
    each image plus its skin view when it has one. ``predictor`` is a ``dermbatch.Predictor``."""
    spec, tta = predictor.seg_spec, predictor.tta["segmentation"]
    rows: list[tuple[np.ndarray, float, bool, str, bool]] = []
    task = progress.add_task("mask quality: segmenting", total=len(items)) if progress else None
    for start in range(0, len(items), batch_size):
        images, truths, groups, lesion = [], [], [], []
        for _image_id, image_path, mask_path, group in items[start:start + batch_size]:
            rgb = predictor.decode(image_path, full_size=True).rgb  # full size: the expert mask's
            truth = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            if truth is None or truth.shape != rgb.shape[:2]:
                raise ValueError(f"{mask_path}: unreadable mask or not the size of {image_path}")
            truth = (truth > 127).astype(np.uint8)
            images.append(rgb), truths.append(truth), groups.append(group), lesion.append(True)
            view = skin_view(rgb, truth, np.random.default_rng([seed, start, len(images)]))
            if view is not None:
                images.append(view), truths.append(np.zeros_like(truth)), groups.append(group)
                lesion.append(False)
        logits = segment_with_tta(predictor.backend.segment, np.stack([model_input(i, spec) for i in images]), tta)
        for rgb, truth, group, real, logit in zip(images, truths, groups, lesion, logits, strict=True):
            mask = mask_from_logits(logit[0], rgb.shape[:2], spec.threshold)
            rows.append((mask_features(logit[0], spec.threshold), jaccard(mask, truth) if real else 0.0, real,
                         group, bool(mask.any())))
        if progress:
            progress.update(task, advance=len(items[start:start + batch_size]))
    features, jac, real, groups, found = zip(*rows, strict=True)
    return Samples(np.stack(features), np.asarray(jac), np.asarray(real), np.asarray(groups), np.asarray(found))


def calibration_error(probs: np.ndarray, outcome: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of a binary probability (equal-width bins)."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(outcome[index == b].mean() - probs[index == b].mean()) * (index == b).mean()
                     for b in range(bins) if (index == b).any()))


def _fit_one(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[object, np.ndarray, dict]:
    """The logistic regression whose C has the lowest grouped inner-CV log loss: (model on all rows, out-of-fold
    probabilities at that C, the C grid's losses)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedGroupKFold

    splits = list(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(x, y, groups))
    losses, oof_at = {}, {}
    for c in C_GRID:
        oof = np.zeros(len(y))
        for train, held in splits:
            model = LogisticRegression(C=c, max_iter=5000).fit(x[train], y[train])
            oof[held] = model.predict_proba(x[held])[:, 1]
        losses[c], oof_at[c] = float(log_loss(y, oof, labels=[0, 1])), oof
    best = min(losses, key=losses.get)
    return LogisticRegression(C=best, max_iter=5000).fit(x, y), oof_at[best], {"C": best, "grid": losses}


def fit_quality(samples: Samples, seed: int = 0, max_missed: float = 0.01) -> tuple[QualityModel, dict]:
    """Both models and their out-of-fold report (AUC, Brier score, calibration error, decision rates)."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    keep = samples.found
    x, groups = samples.features[keep], samples.groups[keep]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    targets = {"reliable": samples.lesion[keep] & (samples.jaccard[keep] >= ISIC_JACCARD_THRESHOLD),
               "lesion": samples.lesion[keep]}
    weights, report = {}, {"images": int(samples.lesion.sum()), "skin_views": int((~samples.lesion).sum()),
                           "with_mask": int(keep.sum()), "features": list(FEATURES)}
    for name, y in targets.items():
        if min(y.sum(), (~y).sum()) < MIN_EXAMPLES:
            from dermbatch.errors import UsageError

            raise UsageError(f"mask calibration: {int(y.sum())} positive and {int((~y).sum())} negative examples of "
                             f"'{name}'; it needs at least {MIN_EXAMPLES} of each: give more images")
        model, oof, choice = _fit_one(z, y.astype(int), groups, seed)
        weights[name] = (model.coef_[0].astype(np.float64), float(model.intercept_[0]))
        report[name] = {"positives": int(y.sum()), "negatives": int((~y).sum()), **choice,
                        "oof_auc": float(roc_auc_score(y, oof)), "oof_brier": float(brier_score_loss(y, oof)),
                        "oof_calibration_error": calibration_error(oof, y)}
        if name == "lesion":
            threshold = float(np.quantile(oof[y], max_missed))
            report[name] |= {"threshold": threshold, "oof_missed_lesions": float((oof[y] < threshold).mean()),
                             "oof_skin_views_rejected": float((oof[~y] < threshold).mean())}
        else:
            threshold = 0.5
            report[name] |= {"threshold": threshold,
                             "oof_flagged_of_reliable": float((oof[y] < threshold).mean()),
                             "oof_flagged_of_unreliable": float((oof[~y] < threshold).mean())}
    quality = QualityModel(FEATURES, mean, scale, weights,
                           {name: report[name]["threshold"] for name in targets})
    return quality, report


def calibration_items(images: Path, masks: Path, labels: Path | None, limit: int | None,
                      seed: int) -> list[tuple[str, Path, Path, str]]:
    """(image id, image, expert mask, lesion group) for every image with a mask; groups from the labels CSV's
    ``lesion_id`` column when given (else each image is its own group); a seeded subset of ``limit`` images."""
    import csv

    from dermbatch.errors import UsageError
    from trainer.data import seg_items

    groups: dict[str, str] = {}
    if labels is not None:
        try:
            rows = list(csv.DictReader(open(labels, encoding="utf-8-sig")))
        except OSError as exc:
            raise UsageError(f"--labels {labels}: cannot read ({exc.strerror})") from None
        id_column = next((c for c in ("image", "image_id") if rows and c in rows[0]), None)
        if id_column is None or "lesion_id" not in rows[0]:
            raise UsageError(f"--labels {labels}: needs an 'image' or 'image_id' column and a 'lesion_id' column")
        groups = {row[id_column]: row["lesion_id"] for row in rows if row["lesion_id"]}
    items = [(i.image_id, i.image, i.mask, groups.get(i.image_id, i.image_id)) for i in seg_items(images, masks)]
    if limit is not None and limit < len(items):
        chosen = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in chosen]
    if len({group for *_, group in items}) < 10:
        raise UsageError(f"{images}: mask calibration needs images of at least 10 lesions: give more images")
    return items


def calibrate_masks(model: Path, images: Path, masks: Path, labels: Path | None = None, limit: int | None = None,
                    seed: int = 0, max_missed: float = 0.01, batch_size: int = 16, device: str = "auto",
                    command: list[str] | None = None, progress=None) -> dict:
    """Fit ``segmentation.quality`` of the bundle at ``model`` (written into its ``bundle.json``, the report
    beside the models, the model card refreshed); returns the report."""
    import json
    import time

    from dermbatch.bundle import write_manifest
    from dermbatch.predictor import Predictor
    from trainer.card import write_model_card

    items = calibration_items(images, masks, labels, limit, seed)
    start = time.perf_counter()
    with Predictor(model, backend="torch", device=device, workers=0) as predictor:
        samples = collect(predictor, items, seed=seed, batch_size=batch_size, progress=progress)
        root = predictor.bundle.path
        manifest = json.loads(json.dumps(predictor.bundle.manifest))
    quality, report = fit_quality(samples, seed=seed, max_missed=max_missed)
    report |= {"data": images.name if images.is_absolute() else images.as_posix(),
               "seconds": round(time.perf_counter() - start, 1),
               "command": " ".join(["dermbatch", *(command or [])[1:]])}
    manifest["segmentation"]["quality"] = quality.to_manifest() | {"report": report}
    write_manifest(root, manifest)
    write_model_card(root)
    for name in ("reliable", "lesion"):
        r = report[name]
        log.info("mask quality %s: C %g, out-of-fold AUC %.3f, Brier %.3f, calibration error %.3f", name, r["C"],
                 r["oof_auc"], r["oof_brier"], r["oof_calibration_error"])
    return report
