"""The metrics the field reports. Segmentation: Jaccard, ISIC thresholded Jaccard (per-image Jaccard set to 0
below 0.65), Dice. Classification: balanced multiclass accuracy (mean recall), per-class recall and
precision, macro AUC, accuracy, confusion matrix, most-confused pairs, expected calibration error."""

from __future__ import annotations

import numpy as np

from dermbatch.bundle import CLASSES

ISIC_JACCARD_THRESHOLD = 0.65


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def segmentation_metrics(jaccards: list[float]) -> dict[str, float]:
    j = np.asarray(jaccards, np.float64)
    return {"images": int(j.size), "jaccard": float(j.mean()),
            "thresholded_jaccard": float(np.where(j >= ISIC_JACCARD_THRESHOLD, j, 0.0).mean()),
            "dice": float((2 * j / (1 + j)).mean())}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes=CLASSES) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    k = len(classes)
    predicted = probs.argmax(1)
    present = np.unique(labels)
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=range(k),
                                                                    zero_division=0)
    aucs = {}
    for c in range(k):
        if c in present and len(present) > 1:
            aucs[classes[c]] = float(roc_auc_score(labels == c, probs[:, c]))
    matrix = confusion_matrix(labels, predicted, labels=range(k))
    pairs = sorted(((int(matrix[t, p]), classes[t], classes[p]) for t in range(k) for p in range(k) if t != p),
                   reverse=True)
    return {
        "images": int(len(labels)),
        # mean recall over the classes present, as sklearn's balanced_accuracy_score (without its warning when a
        # class absent from the truth is predicted)
        "balanced_accuracy": float(recall[present].mean()),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_auc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
        "per_class": {classes[c]: {"recall": float(recall[c]), "precision": float(precision[c]),
                                   "auc": aucs.get(classes[c]), "support": int(support[c])} for c in range(k)},
        "confusion_matrix": {"rows_truth_cols_predicted": list(classes), "counts": matrix.tolist()},
        "most_confused": [{"truth": t, "predicted": p, "count": n} for n, t, p in pairs[:5] if n > 0],
        "ece": expected_calibration_error(probs, labels),
    }


def headline(task: str, m: dict) -> str:
    """The one-line summary of a task's metrics, as the CLI and the evaluation report print it."""
    if task == "segmentation":
        return (f"thresholded Jaccard {m['thresholded_jaccard']:.4f}, Jaccard {m['jaccard']:.4f}, "
                f"Dice {m['dice']:.4f} ({m['images']} images)")
    return (f"balanced accuracy {m['balanced_accuracy']:.4f}, macro AUC {m['macro_auc']:.4f}, "
            f"accuracy {m['accuracy']:.4f}, ECE {m['ece']:.4f} ({m['images']} images)")
