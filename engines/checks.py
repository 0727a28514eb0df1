"""The checks every engine build shares: its outputs against the fp32 reference on real images (the agreement
gate that keeps or refuses a reduced-precision engine), and the provenance written to ``engine.json``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from dermbatch.backends.store import fingerprint
from dermbatch.bundle import Bundle, sha256_file
from dermbatch.errors import BackendError
from dermbatch.tta import softmax

TASKS = ("segmentation", "classification")


def refuse_below(folder: Path, agreements: dict, min_agreement: float, what: str, advice: str) -> None:
    """Delete a reduced-precision engine whose top-1 agreement or mean mask IoU with fp32 is below the bar."""
    worst = min(agreements["segmentation"]["mean_mask_iou"], agreements["classification"]["top1_agreement"])
    if worst < min_agreement:
        shutil.rmtree(folder)
        raise BackendError(f"{what} engine disagrees with fp32 too much ({worst:.3f} < --min-agreement "
                           f"{min_agreement}); not kept. {advice}")


def agreement(task: str, reference: np.ndarray, other: np.ndarray) -> dict:
    """Fold-averaged outputs compared the way the pipeline uses them."""
    result = {"max_abs_diff": float(np.abs(reference - other).max())}
    ref, oth = reference.mean(0), other.mean(0)
    if task == "classification":
        result["top1_agreement"] = float((ref.argmax(-1) == oth.argmax(-1)).mean())
        result["max_prob_diff"] = float(np.abs(softmax(ref) - softmax(oth)).max())
    else:
        a, b = ref > 0, oth > 0
        union = np.logical_or(a, b).sum(axis=(1, 2, 3))
        iou = np.where(union > 0, np.logical_and(a, b).sum(axis=(1, 2, 3)) / np.maximum(union, 1), 1.0)
        result["mean_mask_iou"] = float(iou.mean())
    return result


def engine_info(bundle: Bundle, target: str, precision: str, folder: Path, agreements: dict, extra: dict | None = None):
    import onnxruntime
    import torch

    tasks = {}
    for task in TASKS:
        spec = bundle.spec(task)
        file = next(p.name for p in folder.iterdir() if p.stem == task and p.suffix in (".onnx", ".xml", ".plan"))
        tasks[task] = {"file": file, "sha256": sha256_file(folder / file), "folds": list(spec.folds),
                       "input_size": list(spec.input_size), "layout": "stacked-folds"}
        if file.endswith(".xml"):  # OpenVINO IR: the graph, and its weights beside it
            tasks[task] |= {"weights_file": f"{task}.bin", "weights_sha256": sha256_file(folder / f"{task}.bin")}
    return {"target": target, "precision": precision, "bundle": bundle.name,
            "weights_fingerprint": fingerprint(bundle), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__} | _openvino_version(),
            "tasks": tasks, "agreement": agreements, **(extra or {})}


def _openvino_version() -> dict:
    try:
        import openvino
    except ImportError:
        return {}
    return {"openvino": openvino.__version__}
