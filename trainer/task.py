"""What fine-tuning and frozen-backbone training share: a task's options, its model spec, the seeded initial
model (ImageNet or a warm start), the loss, and the bundle-manifest updates after each fold."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dermbatch.bundle import (
    CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    ModelSpec,
    PreprocessSpec,
    build_manifest,
    load_bundle,
    spec_to_dict,
    write_manifest,
)
from dermbatch.errors import UsageError
from dermbatch.models import build_model
from trainer.data import Item
from trainer.fit import FitConfig, derived_seed
from trainer.losses import BceDiceLoss, ClassificationLoss, class_weights
from trainer.pretrained import load_pretrained, pretrained_normalization
from trainer.splits import SPLITS_FILE

log = logging.getLogger(__name__)
DEFAULT_INPUT = {"segmentation": 256, "classification": 224}


@dataclass
class TaskOptions:
    task: str
    items: list[Item]
    out: Path
    folds: int = 5
    input_size: int | None = None
    architecture: str | None = None
    encoder: str = "tf_efficientnet_lite0"
    pretrained: str = "imagenet"
    warm_start: Path | None = None
    frozen_backbone: bool = False
    tune_stages: int | None = None  # fine-tune stages from this one on over a cached frozen trunk (trainer/tuned.py)
    lora_rank: int = 4
    tune_depthwise: bool = False
    prior_correction: bool = False  # --tune-stages: logit adjustment, tau chosen on an inner split
    jitter_views: int = 8
    extra_items: list[Item] = field(default_factory=list)  # training side of every fold only (--tune-stages)
    tta: str = "flip"
    crop: CropSpec = field(default_factory=CropSpec)
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    class_weights: str = "balanced-sqrt"
    focal_gamma: float = 0.0
    label_smoothing: float = 0.0
    cache_dir: Path | None = None
    resume: bool = False
    data_description: str = ""
    fit: FitConfig = field(default_factory=FitConfig)


def model_spec(opts: TaskOptions) -> ModelSpec:
    size = opts.input_size or DEFAULT_INPUT[opts.task]
    seg = opts.task == "segmentation"
    encoder = f"tu-{opts.encoder}" if seg and not opts.encoder.startswith("tu-") else opts.encoder
    if opts.frozen_backbone or opts.tune_stages:  # frozen batch-norm statistics need the weights' own input
        mean, std = pretrained_normalization(encoder)
        return ModelSpec(opts.task, "timm-multistage", encoder, (size, size), mean, std, tuple(range(opts.folds)),
                         tta=opts.tta)
    return ModelSpec(opts.task, opts.architecture or ("unet" if seg else "timm"), encoder, (size, size),
                     IMAGENET_MEAN, IMAGENET_STD, tuple(range(opts.folds)), tta=opts.tta)


def existing_manifest(out: Path) -> dict | None:
    return load_bundle(out).manifest if (out / "bundle.json").exists() else None


def update_manifest(opts: TaskOptions, spec: ModelSpec, done_folds: list[int], weights: dict, provenance: dict):
    manifest = existing_manifest(opts.out) or build_manifest(None, None, opts.crop, {}, opts.out.name)
    manifest["preprocessing"] = asdict(opts.preprocessing)
    prefix = "seg_" if opts.task == "segmentation" else "cls_"
    manifest["weights"] = {k: v for k, v in manifest["weights"].items() if not k.startswith(prefix)} | weights
    manifest[opts.task] = spec_to_dict(spec) | {"folds": sorted(done_folds)}
    manifest["crop"] = asdict(opts.crop)
    manifest.setdefault("provenance", {})[opts.task] = provenance
    write_manifest(opts.out, manifest)


def new_model(opts: TaskOptions, spec: ModelSpec, fold: int) -> torch.nn.Module:
    """A seeded model for ``fold``: its backbone initialised from ``opts.pretrained``, or the whole model from
    the same fold of the ``opts.warm_start`` bundle."""
    torch.manual_seed(derived_seed(opts.fit.seed, fold, 0, 3))
    model = build_model(spec, num_classes=len(CLASSES))
    if opts.warm_start is None:
        load_pretrained(model, opts.task, spec.encoder, opts.pretrained)
        return model
    from safetensors.torch import load_file

    path = opts.warm_start / f"{'seg' if opts.task == 'segmentation' else 'cls'}_fold{fold}.safetensors"
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    log.info("%s fold %d: warm start from %s", opts.task, fold, path)
    return model


def check_warm_start(opts: TaskOptions, spec: ModelSpec, fold_of: dict[str, int]) -> None:
    """A warm start must come from a bundle with the same model and the same split: each fold's model then
    has still never seen its held-out images, and the out-of-fold metrics stay honest."""
    source = load_bundle(opts.warm_start)
    theirs = source.segmentation if opts.task == "segmentation" else source.classification
    if theirs is None or theirs.encoder != spec.encoder or theirs.architecture != spec.architecture:
        raise UsageError(f"--warm-start {opts.warm_start}: no {opts.task} model with encoder {spec.encoder}")
    if (theirs.mean, theirs.std) != (spec.mean, spec.std):
        raise UsageError(f"--warm-start {opts.warm_start}: its {opts.task} model uses another input normalisation")
    if sorted(theirs.folds) != list(range(opts.folds)):
        raise UsageError(f"--warm-start {opts.warm_start}: it has {opts.task} folds {list(theirs.folds)}, "
                         f"this run needs 0..{opts.folds - 1}")
    splits = opts.warm_start / SPLITS_FILE
    saved = json.loads(splits.read_text()).get(opts.task, {}) if splits.exists() else {}
    if {k: int(v) for k, v in saved.get("fold_of", {}).items()} != fold_of:
        raise UsageError(f"--warm-start {opts.warm_start}: its {opts.task} split differs from this run's; "
                         "its models have seen this run's held-out images (same data, --folds and --seed needed)")


def make_loss(opts: TaskOptions, train_items: list[Item]) -> torch.nn.Module:
    if opts.task == "segmentation":
        return BceDiceLoss()
    weights = class_weights([i.label for i in train_items], len(CLASSES), opts.class_weights)
    return ClassificationLoss(weights, opts.label_smoothing, opts.focal_gamma)
