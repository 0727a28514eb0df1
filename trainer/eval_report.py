"""The ``dermbatch evaluate`` report: matplotlib figures and a static ``report.html`` beside ``evaluation.json``.

Figures: confusion matrix, per-class ROC curves, calibration (reliability) plot, the most-confused class pairs
with example crops and their Grad-CAM heatmaps (Mishra et al. 2019, slide 9, automated), and the
segmentation failures (lowest Jaccard: ground truth vs prediction outlines).
"""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import numpy as np

from dermbatch.outputs import write_bytes_atomic
from trainer.metrics import headline

EXAMPLES_PER_PAIR = 4
PAIRS = 3
FAILURES = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(path: Path, counts: np.ndarray, classes: list[str]) -> None:
    plt = _pyplot()
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for t in range(len(classes)):
        for p in range(len(classes)):
            ax.text(p, t, f"{counts[t, p]}\n{rows[t, p]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if rows[t, p] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("Confusion matrix (counts, row %)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc_figure(path: Path, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for c, name in enumerate(classes):
        positives = labels == c
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f}, n={int(positives.sum())})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class against the rest")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_figure(path: Path, probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> None:
    plt = _pyplot()
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    centres, accuracy, counts = [], [], []
    for b in range(bins):
        inside = which == b
        counts.append(int(inside.sum()))
        if inside.any():
            centres.append(float(confidence[inside].mean()))
            accuracy.append(float(correct[inside].mean()))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
    top.plot(centres, accuracy, "o-", label="model")
    top.set_ylabel("accuracy")
    top.set_title("Calibration (top-class confidence)")
    top.legend(fontsize=8)
    bottom.bar((edges[:-1] + edges[1:]) / 2, counts, width=1 / bins * 0.9)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rgb(path: Path) -> np.ndarray | None:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def confused_pair_figure(path: Path, truth: str, predicted: str, examples: list[dict]) -> None:
    """Each example: ``{"id", "image": Path, "heatmap": Path | None, "prob": float}``, one column each."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(examples), figsize=(2.6 * len(examples), 5.4), squeeze=False)
    for i, ex in enumerate(examples):
        for row, key in enumerate(("image", "heatmap")):
            ax = axes[row][i]
            ax.axis("off")
            image = _rgb(ex[key]) if ex.get(key) else None
            if image is not None:
                ax.imshow(image)
            elif row == 1:
                ax.text(0.5, 0.5, "no heatmap", ha="center", va="center")
        axes[0][i].set_title(f"{ex['id']}\nP({predicted})={ex['prob']:.2f}", fontsize=8)
    fig.suptitle(f"truth {truth}, predicted {predicted}: image and Grad-CAM of {predicted}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay_truth_prediction(rgb: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """RGB image with the ground truth outlined in green and the prediction in red."""
    out = rgb.copy()
    thickness = max(1, round(rgb.shape[1] / 200))
    for mask, colour in ((truth, (40, 220, 40)), (predicted, (230, 30, 30))):
        mask = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness, cv2.LINE_AA)
    return out


def failures_figure(path: Path, failures: list[dict]) -> None:
    """Each failure: ``{"id", "jaccard", "image": RGB, "truth": mask, "predicted": mask}``."""
    plt = _pyplot()
    columns = 4
    rows = max(1, -(-len(failures) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, failures, strict=False):
        ax.imshow(overlay_truth_prediction(f["image"], f["truth"], f["predicted"]))
        ax.set_title(f"{f['id']}  J={f['jaccard']:.2f}", fontsize=8)
    fig.suptitle("Lowest Jaccard: ground truth green, prediction red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_html(out: Path, report: dict, figures: list[tuple[str, str]], sections: list[str] = ()) -> Path:
    """``report.html``: the headline metrics, ``sections`` (HTML written by the caller) and every figure
    (relative links; nothing from the network)."""
    lines = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>",
             "<title>dermbatch evaluation</title><style>body{font:14px system-ui,sans-serif;margin:20px;"
             "background:#fafafa}img{max-width:100%;border:1px solid #ddd;background:#fff}"
             "td,th{padding:2px 10px;text-align:right}th:first-child,td:first-child{text-align:left}"
             "figure{margin:16px 0}</style></head><body>",
             f"<h1>dermbatch evaluation</h1><p>model: <b>{html.escape(str(report.get('model') or 'default'))}"
             f"</b> · images: {html.escape(str(report['images']))} · processed {report['processed']}, "
             f"failed {report['failed']}</p>"]
    if "segmentation" in report:
        lines.append(f"<h2>Segmentation</h2><p>{headline('segmentation', report['segmentation'])}</p>")
    if "classification" in report:
        c = report["classification"]
        lines.append(f"<h2>Classification</h2><p>{headline('classification', c)}</p><table><tr><th>class</th>"
                     "<th>recall</th><th>precision</th><th>AUC</th><th>n</th></tr>")
        for name, v in c["per_class"].items():
            auc = "–" if v["auc"] is None else f"{v['auc']:.3f}"
            lines.append(f"<tr><td>{name}</td><td>{v['recall']:.3f}</td><td>{v['precision']:.3f}</td>"
                         f"<td>{auc}</td><td>{v['support']}</td></tr>")
        lines.append("</table>")
    lines += sections
    for file, caption in figures:
        lines.append(f"<figure><img src='{html.escape(file)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    lines.append("</body></html>")
    path = out / "report.html"
    write_bytes_atomic(path, "\n".join(lines).encode("utf-8"))
    return path
