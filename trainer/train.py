"""``dermbatch train``: k-fold training of one task into a bundle (adding to what the bundle already has).

Per fold: build the model, initialise the backbone, fit with checkpoints, keep the best epoch, write its
weights into the bundle and the manifest (so a bundle is usable after any finished fold), and write the
fold's out-of-fold predictions. After the last fold: ``metrics.json`` from all OOF predictions, and the
model card.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dermbatch.bundle import CLASSES, ModelSpec, PreprocessSpec, load_bundle, save_weights
from dermbatch.errors import UsageError
from trainer import distributed
from trainer.card import write_model_card
from trainer.dataset import TrainingSet, default_cache_dir
from trainer.fit import fit_fold
from trainer.masks import predict_missing_masks
from trainer.metrics import classification_metrics, segmentation_metrics
from trainer.oof import classification_oof, read_rows, segmentation_oof, write_rows
from trainer.splits import load_or_make
from trainer.task import (
    TaskOptions,
    check_warm_start,
    existing_manifest,
    make_loss,
    model_spec,
    new_model,
    update_manifest,
)

log = logging.getLogger(__name__)


def _check_compatible(opts: TaskOptions, spec: ModelSpec, previous: dict | None, section: dict) -> None:
    """Refuse to mix this training into a bundle made with other settings."""
    if section and (section.get("encoder") != spec.encoder or section.get("input_size") != list(spec.input_size)
                    or section.get("architecture") != spec.architecture):
        raise UsageError(f"{opts.out} already has a {opts.task} model with another architecture, encoder or "
                         "input size; use a new --out")
    if previous and PreprocessSpec(**previous.get("preprocessing", {})) != opts.preprocessing:
        raise UsageError(f"{opts.out} was trained with preprocessing {previous.get('preprocessing')}; "
                         "both models of a bundle share it: pass the same --color-constancy/--gamma, "
                         "or use a new --out")
    if section and not opts.resume:
        raise UsageError(f"{opts.out} already has a {opts.task} model; pass --resume to continue it or use a new --out")


def train_task(opts: TaskOptions, progress=None) -> dict:
    """Train every fold of ``opts``; return the out-of-fold metrics (under torchrun: rank 0's, ``{}`` elsewhere)."""
    spec = model_spec(opts)
    distributed.check_options(distributed.world(), opts.fit.batch_size, opts.frozen_backbone, opts.tune_stages)
    if opts.task == "classification" and any(i.mask is None for i in opts.items):
        if (opts.out / "bundle.json").exists() and load_bundle(opts.out).segmentation is not None:
            opts.items = distributed.main_first(lambda: predict_missing_masks(
                opts.out, opts.items, opts.cache_dir or default_cache_dir(), opts.fit.device))
        else:
            log.warning("classification: no masks and no segmentation model in %s: training on whole images, "
                        "unlike `dermbatch run`, which crops to the lesion; train --task seg first or pass --masks",
                        opts.out)
    labels = [i.label for i in opts.items] if opts.task == "classification" else None
    groups = [i.group or i.image_id for i in opts.items]
    fold_of = distributed.main_first(lambda: load_or_make(  # rank 0 writes splits.json, the others read it
        opts.out, opts.task, [i.image_id for i in opts.items], opts.folds, opts.fit.seed, labels,
        groups if any(i.group for i in opts.items) else None))
    if opts.warm_start is not None:
        check_warm_start(opts, spec, fold_of)
    previous = existing_manifest(opts.out)
    section = (previous or {}).get(opts.task) or {}
    _check_compatible(opts, spec, previous, section)
    done = list(section.get("folds", [])) if opts.resume else []
    prefix = "seg" if opts.task == "segmentation" else "cls"
    weights = {name: digest for name, digest in (previous or {}).get("weights", {}).items()
               if name.startswith(prefix) and (m := re.search(r"fold(\d+)", name)) and int(m.group(1)) in done}
    cache = opts.cache_dir or default_cache_dir()
    provenance = {"command": sys.argv, "data": opts.data_description, "images": len(opts.items),
                  "pretrained": opts.pretrained, "warm_start": str(opts.warm_start) if opts.warm_start else None,
                  "fit": asdict(opts.fit), "class_weights": opts.class_weights,
                  "focal_gamma": opts.focal_gamma, "label_smoothing": opts.label_smoothing,
                  "processes": distributed.world(), "torch": torch.__version__,
                  "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if opts.frozen_backbone:
        from trainer.frozen import train_frozen

        train_frozen(opts, spec, fold_of, done, weights, provenance, cache, progress)
    elif opts.tune_stages is not None:
        from trainer.tuned import train_tuned

        train_tuned(opts, spec, fold_of, done, weights, provenance, cache, progress)
    else:
        _fine_tune_folds(opts, spec, fold_of, done, weights, provenance, cache, progress)
    if not distributed.is_main():
        return {}
    metrics = oof_metrics(opts.out, opts.task, opts.folds)
    if opts.task == "classification":
        _store_operating_points(opts)
    write_model_card(opts.out)
    return metrics


def _store_operating_points(opts: TaskOptions) -> None:
    """The screening operating points of the finished classifier, chosen on its out-of-fold predictions."""
    from trainer.operating_points import oof_files, points_from_oof, store_points

    points, source = points_from_oof(oof_files(opts.out / "oof"), {i.image_id: i.group for i in opts.items})
    if points:
        store_points(opts.out, points, source)
        log.info("screening: %d operating points stored (%s)", len(points), ", ".join(p.name for p in points))


def _fine_tune_folds(opts: TaskOptions, spec: ModelSpec, fold_of: dict[str, int], done: list[int], weights: dict,
                     provenance: dict, cache: Path, progress=None) -> None:
    """Every fold not in ``done``: fit the whole model, save its best epoch and its out-of-fold predictions."""
    prefix = "seg" if opts.task == "segmentation" else "cls"
    for fold in range(opts.folds):
        if fold in done:
            log.info("%s fold %d: already in the bundle, skipped", opts.task, fold)
            continue
        train_items = [i for i in opts.items if fold_of[i.image_id] != fold]
        val_items = [i for i in opts.items if fold_of[i.image_id] == fold]
        log.info("%s fold %d: %d training, %d validation images", opts.task, fold, len(train_items), len(val_items))
        model = new_model(opts, spec, fold)
        train_set = TrainingSet(train_items, opts.task, spec, opts.crop, cache, True, opts.fit.seed, opts.preprocessing)
        val_set = TrainingSet(val_items, opts.task, spec, opts.crop, cache, False, opts.fit.seed, opts.preprocessing)
        loss = make_loss(opts, train_items)
        checkpoint = opts.out / "checkpoints" / f"{prefix}_fold{fold}.pt"
        outcome = fit_fold(model, spec, train_set, val_set, loss, opts.fit, fold, checkpoint,
                           opts.out / "logs" / f"{prefix}_fold{fold}.csv", opts.resume, progress)
        if not distributed.is_main():  # rank 0 writes the fold; the others wait for it before the next one
            distributed.barrier()
            continue
        model.load_state_dict(outcome.best_state)
        model.to(opts.fit.device)
        if opts.task == "segmentation":
            rows = segmentation_oof(model, spec, val_items, opts.fit.device, opts.preprocessing)
        else:
            rows = classification_oof(model, spec, val_set, opts.fit.device)
        write_rows(opts.out / "oof" / f"{prefix}_fold{fold}.csv", rows, fold)
        name, digest = save_weights(opts.out, opts.task, fold, outcome.best_state)
        weights[name] = digest
        done.append(fold)
        update_manifest(opts, spec, done, weights, provenance)
        checkpoint.unlink(missing_ok=True)  # the fold is in the bundle now; resuming skips it
        log.info("%s fold %d: best epoch %d, validation score %.4f; saved %s", opts.task, fold,
                 outcome.best_epoch, outcome.best_score, name)
        distributed.barrier()


def oof_metrics(out: Path, task: str, folds: int) -> dict:
    """Metrics over every image's out-of-fold prediction; stored in ``metrics.json`` under the task."""
    prefix = "seg" if task == "segmentation" else "cls"
    rows = read_rows([out / "oof" / f"{prefix}_fold{k}.csv" for k in range(folds)
                      if (out / "oof" / f"{prefix}_fold{k}.csv").exists()])
    if task == "segmentation":
        metrics = segmentation_metrics([float(r["jaccard"]) for r in rows])
    else:
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        metrics = classification_metrics(probs, np.array([CLASSES.index(r["label"]) for r in rows]))
    metrics["folds"] = sorted({int(r["fold"]) for r in rows})
    metrics["train_images_per_s"] = _mean_training_speed(out, prefix)
    path = out / "metrics.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[task] = metrics
    path.write_text(json.dumps(stored, indent=2))
    return metrics


def _mean_training_speed(out: Path, prefix: str) -> float | None:
    import csv

    speeds = [float(row["train_images_per_s"]) for log_file in sorted((out / "logs").glob(f"{prefix}_fold*.csv"))
              for row in csv.DictReader(open(log_file))]
    return float(np.mean(speeds)) if speeds else None
