"""From command-line options to the list of tasks to train (items, specs, fit settings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermbatch.bundle import CLASSES
from dermbatch.errors import UsageError
from dermbatch.manifest import TTA_MODES
from trainer.data import Item, cls_items, official_paths, seg_items
from trainer.fit import FitConfig
from trainer.losses import CLASS_WEIGHTS
from trainer.optim import SCHEDULES
from trainer.task import TaskOptions


def subset(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded random subset of about ``limit`` images, taking whole lesions."""
    if not limit or limit >= len(items):
        return items
    groups = sorted({i.group or i.image_id for i in items})
    order = np.random.default_rng(seed).permutation(len(groups))
    chosen, count = set(), 0
    by_group: dict[str, int] = {}
    for item in items:
        key = item.group or item.image_id
        by_group[key] = by_group.get(key, 0) + 1
    for index in order:
        if count >= limit:
            break
        chosen.add(groups[index])
        count += by_group[groups[index]]
    return [i for i in items if (i.group or i.image_id) in chosen]


def plan_tasks(task: str, *, out: Path, data: Path, images: Path | None, masks: Path | None, labels: Path | None,
               limit: int | None, cache: Path | None, resume: bool, fit: dict, extra: tuple | None = None,
               **model_options) -> list[TaskOptions]:
    """``extra``: (images, labels CSV, masks or None, classes to keep or None): labelled images added to the
    training side of every fold (never held out, never in the out-of-fold metrics); ``--tune-stages`` only."""
    if fit["schedule"] not in SCHEDULES:
        raise UsageError(f"--schedule {fit['schedule']!r}: choose {', '.join(SCHEDULES)}")
    if model_options["class_weights"] not in CLASS_WEIGHTS:
        raise UsageError(f"--class-weights {model_options['class_weights']!r}: choose {', '.join(CLASS_WEIGHTS)}")
    if model_options["tta"] not in TTA_MODES:
        raise UsageError(f"--tta {model_options['tta']!r}: choose none, flip or d4")
    if model_options.get("tune_stages") is not None:
        if task != "classification":
            raise UsageError("--tune-stages fine-tunes a classifier: use it with --task cls")
        if model_options.get("frozen_backbone") or model_options.get("warm_start") \
                or model_options.get("pretrained") == "none":
            raise UsageError("--tune-stages starts from the ImageNet backbone: it goes with none of "
                             "--frozen-backbone, --warm-start, --pretrained none")
        if model_options.get("lora_rank", 0) < 0 or model_options.get("jitter_views", 0) < 0:
            raise UsageError("--lora-rank and --jitter-views must be 0 or more")
    if model_options.get("frozen_backbone"):
        if task != "classification":
            raise UsageError("--frozen-backbone trains a classifier: use it with --task cls")
        if model_options.get("warm_start") or model_options.get("pretrained") == "none":
            raise UsageError("--frozen-backbone keeps the pretrained backbone: it goes with neither --warm-start "
                             "nor --pretrained none")
    jobs: list[tuple[str, list[Item], str]] = []
    if task == "both":
        if images or labels:
            raise UsageError("--images/--labels go with --task seg or --task cls; --task both reads --data")
        paths = official_paths(data)
        jobs.append(("segmentation", seg_items(paths["seg_images"], paths["seg_masks"]), str(data)))
        jobs.append(("classification", cls_items(paths["cls_images"], paths["cls_labels"], masks,
                                                 paths["cls_groups"]), str(data)))
    elif task == "segmentation":
        if images is None or masks is None:
            raise UsageError("--task seg needs --images DIR and --masks DIR")
        jobs.append((task, seg_items(images, masks), f"{images} + {masks}"))
    else:
        if images is None or labels is None:
            raise UsageError("--task cls needs --images DIR and --labels CSV (and --masks DIR for lesion crops)")
        jobs.append((task, cls_items(images, labels, masks), f"{images} + {labels}"))
    plans = []
    for name, items, description in jobs:
        chosen = subset(items, limit, fit["seed"])
        extra_items = _extra_items(extra, chosen, model_options) if extra else []
        if extra_items:
            description += f"; training folds also: {extra[0]} + {extra[1]} ({len(extra_items)} images)"
        plans.append(TaskOptions(task=name, items=chosen, out=Path(out), cache_dir=cache, resume=resume,
                                 data_description=description + (f" (subset of {len(chosen)})" if limit else ""),
                                 fit=FitConfig(**fit), extra_items=extra_items, **model_options))
    return plans


def _extra_items(extra: tuple, items: list[Item], model_options: dict) -> list[Item]:
    images, labels, masks, classes = extra
    if model_options.get("tune_stages") is None:
        raise UsageError("--extra-images/--extra-labels go with --tune-stages")
    if images is None or labels is None:
        raise UsageError("extra training images need both --extra-images DIR and --extra-labels CSV")
    keep = None
    if classes:
        keep = {c.strip().upper() for c in classes.split(",") if c.strip()}
        if not keep <= set(CLASSES):
            raise UsageError(f"--extra-classes {classes!r}: choose among {', '.join(CLASSES)}")
    found = [i for i in cls_items(images, labels, masks) if keep is None or CLASSES[i.label] in keep]
    ids = {i.image_id for i in items}
    clash = [i.image_id for i in found if i.image_id in ids]
    if clash:
        raise UsageError(f"--extra-images {images}: {len(clash)} images (e.g. {clash[0]}) are also in --images")
    return [Item(i.image_id, i.image, i.mask, i.label, f"extra:{i.group or i.image_id}") for i in found]
