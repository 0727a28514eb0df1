"""``dermbatch evaluate``: run the pipeline on images with ground truth and score it the ISIC way.

Masks are scored from the PNG files ``dermbatch run`` writes (exactly what the official scorer reads);
classes from its results CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from dermbatch.bundle import CLASSES
from dermbatch.pipeline import RunOptions, run
from trainer.data import find_mask, read_labels
from trainer.dataset import read_mask
from trainer.metrics import classification_metrics, jaccard, segmentation_metrics


def evaluate(model: str | None, images: Path, out: Path, masks: Path | None = None, labels: Path | None = None,
             **run_options) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    options = RunOptions(inputs=[str(images)], out=out / "predictions.csv", model=model,
                         masks=out / "masks" if masks else None, overwrite=True, **run_options)
    summary = run(options)
    report: dict = {"model": model, "images": str(images), "processed": summary.ok, "failed": summary.failed}
    if masks is not None:
        scores = []
        for predicted in sorted((out / "masks").glob("*_segmentation.png")):
            image_id = predicted.name[: -len("_segmentation.png")]
            truth_path = find_mask(masks, image_id)
            if truth_path is not None:
                pred = _binary(predicted)
                scores.append(jaccard(pred, read_mask(truth_path, pred.shape)))
        report["segmentation"] = segmentation_metrics(scores)
    if labels is not None:
        truth = read_labels(labels)
        rows = [r for r in csv.DictReader(open(options.out)) if r["image"] in truth]
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        report["classification"] = classification_metrics(probs, np.array([truth[r["image"]][0] for r in rows]))
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    return report


def _binary(path: Path) -> np.ndarray:
    import cv2

    return (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 128).astype(np.uint8)  # the scorer's threshold
