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
ENGINE_SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml", "tensorrt": ".plan"}  # the file each runtime loads


def refuse_below(folder: Path, agreements: dict, min_agreement: float, what: str, advice: str) -> None:
    """Delete a reduced-precision engine whose top-1 agreement or mean mask IoU with fp32 is below the bar."""
    worst = min(agreements["segmentation"]["mean_mask_iou"], agreements["classification"]["top1_agreement"])
    if worst < min_agreement:
        shutil.rmtree(folder)
        raise BackendError(f"{what} engine disagrees with fp32 too much ({worst:.3f} < --min-agreement "
                           f"{min_agreement}); not kept. {advice}")


def refuse_unfit(folder: Path, agreements: dict, min_agreement: float, what: str) -> None:
    """Delete an engine with a non-finite output or an agreement with fp32 below the bar (TensorRT plans)."""
    if not all(a.get("finite", True) and np.isfinite(a["max_abs_diff"]) for a in agreements.values()):
        shutil.rmtree(folder)
        raise BackendError(f"{what} engine gave non-finite outputs on the check images; not kept. "
                           "Try --precision fp32")
    refuse_below(folder, agreements, min_agreement, what, "Try --precision fp32")


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
    """``engine.json``: the file of each task that the target's runtime loads (named by its suffix: a TensorRT
    folder also holds the ``.onnx`` it was built from), its hash, folds and input size, and the provenance."""
    import onnxruntime
    import torch

    tasks = {}
    for task in TASKS:
        spec = bundle.spec(task)
        file = f"{task}{ENGINE_SUFFIX[target]}"
        if not (folder / file).is_file():
            raise BackendError(f"{folder / file}: missing after the {target} build")
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
