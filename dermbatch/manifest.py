"""Validation of ``bundle.json``: known keys, types and ranges, with messages that name the field."""

from __future__ import annotations

import math
import re
from typing import Any

from dermbatch.errors import BundleError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_NAME = re.compile(r"^(seg|cls)_(fold\d+|shared)\.safetensors$")
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
TASKS = ("segmentation", "classification")
TASK_PREFIX = {"segmentation": "seg", "classification": "cls"}
TTA_MODES = ("none", "flip", "d4")
BACKGROUND_MODES = ("keep", "mask")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOP_KEYS = {"format_version", "name", "description", "classes", "segmentation", "classification",
             "crop", "weights", "provenance", "preprocessing"}
_MODEL_KEYS = {"architecture", "encoder", "input_size", "mean", "std", "folds", "tta", "threshold", "quality",
               "screening"}
_CROP_KEYS = {"margin", "square", "background"}
_PRE_KEYS = {"color_constancy", "gamma"}
COLOR_CONSTANCY = ("none", "shades_of_gray")



def validate_manifest(manifest: Any, where: str) -> None:
    """Raise BundleError naming the first field that is unknown, missing or of the wrong type."""
    def fail(field: str, problem: str):
        raise BundleError(f"{where}: {field}: {problem}")

    def check_keys(section: dict, allowed: set, prefix: str):
        unknown = sorted(set(section) - allowed)
        if unknown:
            fail(prefix + unknown[0], f"unknown key (known: {', '.join(sorted(allowed))})")

    if not isinstance(manifest, dict):
        fail("(top level)", "must be a JSON object")
    check_keys(manifest, _TOP_KEYS, "")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        fail("format_version", f"is {version!r}; this dermbatch reads version {FORMAT_VERSION}")
    if list(manifest.get("classes", [])) != list(CLASSES):
        fail("classes", f"must be the ISIC 2018 classes in order {list(CLASSES)}")
    weights = manifest.get("weights")
    if not isinstance(weights, dict):
        fail("weights", "must map weight file names to sha256 hex digests")
    for name, digest in weights.items():
        if not _WEIGHT_NAME.match(str(name)):
            fail(f"weights.{name}", "file names must look like seg_fold0.safetensors / cls_fold0.safetensors "
                                        "(or cls_shared.safetensors: tensors every fold shares)")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            fail(f"weights.{name}", "must be a 64-character lowercase sha256 hex digest")

    if not any(manifest.get(task) for task in TASKS):
        fail("segmentation/classification", "a bundle needs at least one model")
    for task in TASKS:
        section = manifest.get(task)
        if section is None:
            continue
        if not isinstance(section, dict):
            fail(task, "must be an object")
        check_keys(section, _MODEL_KEYS, f"{task}.")
        for key in ("architecture", "encoder"):
            if not isinstance(section.get(key), str) or not section[key]:
                fail(f"{task}.{key}", "must be a non-empty string")
        size = section.get("input_size")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 16 <= v <= 4096 for v in size)):
            fail(f"{task}.input_size", "must be [height, width], integers in 16..4096")
        for key in ("mean", "std"):
            values = section.get(key, [0.5, 0.5, 0.5])
            if not (isinstance(values, list) and len(values) == 3 and all(_is_num(v) for v in values)):
                fail(f"{task}.{key}", "must be a list of 3 numbers")
        if any(v <= 0 for v in section.get("std", [1, 1, 1])):
            fail(f"{task}.std", "values must be positive")
        folds = section.get("folds")
        if not (isinstance(folds, list) and folds and all(_is_int(f) and f >= 0 for f in folds)
                and len(set(folds)) == len(folds)):
            fail(f"{task}.folds", "must be a non-empty list of distinct fold numbers")
        for fold in folds:
            name = f"{TASK_PREFIX[task]}_fold{fold}.safetensors"
            if name not in weights:
                fail("weights", f"{name} (fold {fold} of {task}) is not listed")
        tta = section.get("tta", "flip")
        if tta not in TTA_MODES:
            fail(f"{task}.tta", f"is {tta!r}; choose one of {', '.join(TTA_MODES)}")
        if tta == "d4" and size[0] != size[1]:
            fail(f"{task}.tta", "d4 needs a square input_size")
        threshold = section.get("threshold", 0.5)
        if not (_is_num(threshold) and 0 < threshold < 1):
            fail(f"{task}.threshold", "must be a number strictly between 0 and 1")
        if "quality" in section and (task != "segmentation" or not isinstance(section["quality"], dict)):
            fail(f"{task}.quality", "only segmentation has one: an object written by `dermbatch calibrate-masks`")
        if "screening" in section and (task != "classification" or not isinstance(section["screening"], dict)
                                       or not isinstance(section["screening"].get("points"), list)):
            fail(f"{task}.screening", "only classification has one: an object with a list of points, written by "
                                      "`dermbatch operating-points`")

    crop = manifest.get("crop", {})
    if not isinstance(crop, dict):
        fail("crop", "must be an object")
    check_keys(crop, _CROP_KEYS, "crop.")
    margin = crop.get("margin", 0.1)
    if not (_is_num(margin) and 0 <= margin <= 2):
        fail("crop.margin", "must be a number in 0..2 (fraction of the lesion box)")
    if not isinstance(crop.get("square", True), bool):
        fail("crop.square", "must be true or false")
    if crop.get("background", "keep") not in BACKGROUND_MODES:
        fail("crop.background", f"choose one of {', '.join(BACKGROUND_MODES)}")
    for key in ("provenance", "preprocessing"):
        if not isinstance(manifest.get(key, {}), dict):
            fail(key, "must be an object")
    pre = manifest.get("preprocessing", {})
    check_keys(pre, _PRE_KEYS, "preprocessing.")
    if pre.get("color_constancy", "none") not in COLOR_CONSTANCY:
        fail("preprocessing.color_constancy", f"choose one of {', '.join(COLOR_CONSTANCY)}")
    gamma = pre.get("gamma", 1.0)
    if not (_is_num(gamma) and 0.2 <= gamma <= 5):
        fail("preprocessing.gamma", "must be a number in 0.2..5")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
