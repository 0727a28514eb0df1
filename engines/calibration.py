"""Real-image batches for engine checks and INT8 calibration, preprocessed exactly as ``dermbatch run`` does.

Segmentation inputs are the resized images; classification inputs are the lesion crops the bundle's own
torch models make (segment, post-process, crop), so the classifier is calibrated on what it will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermbatch.inputs import discover_inputs
from dermbatch.predictor import Predictor
from dermbatch.preprocess import model_input


def calibration_inputs(bundle_path: Path, images: Path | list[Path], limit: int = 64) -> dict[str, np.ndarray]:
    items = discover_inputs([images] if isinstance(images, Path) else images)
    step = max(1, len(items) // limit)
    items = items[::step][:limit]
    seg, cls = [], []
    with Predictor(bundle_path, backend="torch", device="cpu", tta="none", workers=0, batch_size=8) as predictor:
        for result in predictor.predict(items):
            if result.ok:
                seg.append(model_input(result.image, predictor.seg_spec))
                cls.append(model_input(result.crop, predictor.cls_spec))
    if not seg:
        raise ValueError(f"no readable calibration image in {images}")
    return {"segmentation": np.stack(seg), "classification": np.stack(cls)}
