"""Choosing a bundle's screening operating points out of fold and storing them in its ``bundle.json``.

The out-of-fold predictions are those training wrote (``<bundle>/oof/cls_fold*.csv``, or a folder given with
``--oof``), or, for a bundle that no longer has them (the shipped default), made again: each fold's model on
the images its fold held out in ``splits.json``, cropped and augmented the way training scored them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from dermbatch.bundle import CLASSES, Bundle, load_bundle, write_manifest
from dermbatch.errors import UsageError
from dermbatch.screening import BOOTSTRAP, TARGETS, OperatingPoint, choose_points
from trainer.card import write_model_card
from trainer.data import Item
from trainer.oof import read_rows, write_rows
from trainer.splits import SPLITS_FILE

log = logging.getLogger(__name__)


def oof_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("cls_fold*.csv"))


def predict_oof(bundle: Bundle, items: list[Item], out: Path, device: str = "cpu", cache: Path | None = None) -> None:
    """Write ``out/cls_fold<k>.csv`` for every classification fold of ``bundle`` that lacks one: fold k's model
    on the images that ``splits.json`` holds out for fold k (a fold already written is kept: resumable)."""
    from dermbatch.models import load_fold_model
    from trainer.dataset import TrainingSet, default_cache_dir
    from trainer.oof import classification_oof

    path = bundle.path / SPLITS_FILE
    try:
        fold_of = json.loads(path.read_text())["classification"]["fold_of"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: no classification split to make out-of-fold predictions with ({exc})") from None
    spec = bundle.spec("classification")
    for fold in spec.folds:
        target = out / f"cls_fold{fold}.csv"
        if target.exists():
            log.info("fold %d: out-of-fold predictions already in %s", fold, target)
            continue
        held = [item for item in items if fold_of.get(item.image_id) == fold]
        if not held:
            raise UsageError(f"fold {fold}: none of the given images is held out by {path}")
        start = time.perf_counter()
        held_set = TrainingSet(held, "classification", spec, bundle.crop, cache or default_cache_dir(), False,
                               0, bundle.preprocessing)
        rows = classification_oof(load_fold_model(bundle, "classification", fold).to(device), spec, held_set, device)
        write_rows(target, rows, fold)
        log.info("fold %d: %d held-out images predicted in %.0f s", fold, len(rows), time.perf_counter() - start)


def points_from_oof(files: list[Path], groups: dict[str, str | None], targets=TARGETS, resamples: int = BOOTSTRAP,
                    seed: int = 0) -> tuple[list[OperatingPoint], dict]:
    """The operating points of these out-of-fold rows, and a description of what they were chosen on."""
    rows = read_rows(files)
    if not rows:
        raise UsageError("no out-of-fold predictions to choose operating points from")
    probabilities = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    lesion = [groups.get(r["image"]) or r["image"] for r in rows]  # an image without a lesion id is its own group
    points = choose_points(probabilities, labels, lesion, CLASSES, targets, resamples, seed)
    source = {"images": len(rows), "lesions": len(set(lesion)), "folds": sorted({int(r["fold"]) for r in rows}),
              "bootstrap": {"resamples": resamples, "seed": seed, "grouped_by": "lesion_id", "interval": 0.95},
              "chosen_on": "out-of-fold predictions (each image scored by the fold model that did not train on it)"}
    return points, source


def store_points(bundle_dir: Path, points: list[OperatingPoint], source: dict) -> Path:
    """Write the points into ``classification.screening`` of the bundle's manifest (validated, atomically)."""
    bundle = load_bundle(bundle_dir)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["classification"]["screening"] = {**source, "points": [p.to_manifest() for p in points]}
    path = write_manifest(bundle_dir, manifest)
    load_bundle(bundle_dir)  # what was written reads back
    write_model_card(bundle_dir)
    return path
