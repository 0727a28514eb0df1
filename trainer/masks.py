"""Lesion masks for classifier training when the data set has none (e.g. the official ISIC 2018 Task 3 layout).

The bundle's own segmentation ensemble predicts them exactly as ``dermbatch run`` would (same decoding,
preprocessing and post-processing; no TTA, for speed), so the classifier trains on the crops the pipeline
will feed it. Predicted masks are cached by bundle weights and image content.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from dermbatch.backends.torch import TorchBackend
from dermbatch.bundle import load_bundle
from dermbatch.imageio import decode_image
from dermbatch.predictor import segment_images
from dermbatch.preprocess import correct_colors
from trainer.data import Item

log = logging.getLogger(__name__)


def predict_missing_masks(bundle_dir: Path, items: list[Item], cache_root: Path, device: str = "cpu",
                          batch: int = 8) -> list[Item]:
    """Items without a mask get one predicted by the bundle's segmentation folds (cached as PNG)."""
    missing = [i for i in items if i.mask is None]
    if not missing:
        return items
    bundle = load_bundle(bundle_dir)
    spec = bundle.spec("segmentation")
    weights_id = hashlib.sha1("".join(sorted(bundle.hashes().values())).encode()).hexdigest()[:12]
    folder = cache_root / f"predicted-masks-{weights_id}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {i.image_id: folder / f"{hashlib.sha1(i.image.read_bytes()).hexdigest()}.png" for i in missing}
    todo = [i for i in missing if not paths[i.image_id].exists()]
    if todo:
        log.info("classification: predicting lesion masks for %d images with the bundle's segmentation folds %s",
                 len(todo), spec.folds)
        backend = TorchBackend(bundle, device=device, folds={"segmentation": spec.folds})
        for start in range(0, len(todo), batch):
            group = todo[start:start + batch]
            images = [correct_colors(decode_image(i.image, min_side=4 * max(spec.input_size)).rgb,
                                     bundle.preprocessing) for i in group]
            for item, mask in zip(group, segment_images(backend.segment, spec, images, "none"), strict=True):
                cv2.imwrite(str(paths[item.image_id]), mask * np.uint8(255))
        backend.close()
    return [replace(i, mask=paths[i.image_id]) if i.mask is None else i for i in items]
