"""Out-of-fold predictions made the way ``dermbatch run`` makes them (same preprocessing, TTA, post-processing)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from dermbatch.bundle import CLASSES, ModelSpec, PreprocessSpec
from dermbatch.imageio import decode_image
from dermbatch.predictor import segment_images
from dermbatch.preprocess import correct_colors, normalize
from dermbatch.tta import classify_with_tta, softmax
from trainer.data import Item
from trainer.dataset import TrainingSet, read_mask
from trainer.metrics import jaccard


def _model_fn(model, device: str, chunk: int = 16):
    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        parts = [model(torch.from_numpy(batch[i:i + chunk]).to(device)).float().cpu().numpy()
                 for i in range(0, len(batch), chunk)]
        return np.concatenate(parts)[None]  # one "fold"
    return run


def segmentation_oof(model, spec: ModelSpec, items: list[Item], device: str, pre: PreprocessSpec,
                     batch: int = 8) -> list[dict]:
    """Per-image Jaccard of the post-processed mask at the image's own size."""
    model.eval()
    rows, fn = [], _model_fn(model, device)
    for start in range(0, len(items), batch):
        group = items[start:start + batch]
        images = [correct_colors(decode_image(item.image).rgb, pre) for item in group]
        for item, rgb, mask in zip(group, images, segment_images(fn, spec, images, spec.tta), strict=True):
            rows.append({"image": item.image_id, "jaccard": jaccard(mask, read_mask(item.mask, rgb.shape[:2]))})
    return rows


def classification_oof(model, spec: ModelSpec, dataset: TrainingSet, device: str, batch: int = 16) -> list[dict]:
    """Probabilities for the exact crops the pipeline makes (cached 'crop' view), with the bundle's TTA."""
    model.eval()
    rows, fn = [], _model_fn(model, device)
    for start in range(0, len(dataset), batch):
        indices = range(start, min(len(dataset), start + batch))
        x = np.stack([normalize(dataset.arrays(i)["crop"], spec) for i in indices])
        probs = softmax(classify_with_tta(fn, x, spec.tta).astype(np.float64))
        for i, p in zip(indices, probs, strict=True):
            item = dataset.items[i]
            rows.append({"image": item.image_id, "label": CLASSES[item.label],
                         **{c: float(v) for c, v in zip(CLASSES, p, strict=True)}})
    return rows


def write_rows(path: Path, rows: list[dict], fold: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "fold", *[k for k in rows[0] if k != "image"]])
        writer.writeheader()
        for row in rows:
            writer.writerow({"fold": fold, **{k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()}})


def read_rows(paths: list[Path]) -> list[dict]:
    return [row for path in paths for row in csv.DictReader(open(path))]
