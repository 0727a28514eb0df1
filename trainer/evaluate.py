"""``dermbatch evaluate``: run the pipeline on images with ground truth, score it the ISIC way, and draw the report.

Masks are scored from the PNG files ``dermbatch run`` writes (exactly what the official scorer reads);
classes from its results CSV. ``report.html`` (see ``trainer.eval_report``) goes beside ``evaluation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from dermbatch.bundle import CLASSES, load_bundle
from dermbatch.outputs import read_complete_rows
from dermbatch.pipeline import RunOptions, run
from trainer import eval_report, screening_eval
from trainer.data import find_mask, read_labels
from trainer.dataset import read_mask
from trainer.metrics import classification_metrics, jaccard, segmentation_metrics


def evaluate(model: str | None, images: Path, out: Path, masks: Path | None = None, labels: Path | None = None,
             explain: bool = True, first_use=None, **run_options) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    options = RunOptions(inputs=[str(images)], out=out / "predictions.csv", model=model,
                         masks=out / "masks" if masks else None, crops=out / "crops" if labels else None,
                         explain=out / "explain" if labels and explain else None, overwrite=True, **run_options)
    summary = run(options, first_use=first_use)
    report: dict = {"model": model, "images": str(images), "processed": summary.ok, "failed": summary.failed}
    paths = {row["image"]: Path(row["path"]) for row in read_complete_rows(options.details) if row["status"] == "ok"}
    figures: list[tuple[str, str]] = []
    sections: list[str] = []
    if masks is not None:
        scores = _mask_scores(out / "masks", masks)
        report["segmentation"] = segmentation_metrics([j for _, j, _, _ in scores])
        figures += _segmentation_figures(out, scores, paths)
    if labels is not None:
        truth = read_labels(labels)
        rows = [r for r in read_complete_rows(options.out) if r["image"] in truth]
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        targets = np.array([truth[r["image"]][0] for r in rows])
        report["classification"] = classification_metrics(probs, targets)
        figures += _classification_figures(out, [r["image"] for r in rows], probs, targets,
                                           report["classification"]["most_confused"])
        points = load_bundle(model).screening
        if points:
            groups = [truth[r["image"]][1] or r["image"] for r in rows]
            report["screening"] = screening_eval.check_points(points, probs, targets, groups)
            screening_eval.roc_figure(out / screening_eval.FIGURE, probs, targets, points)
            sections.append(screening_eval.html_table(report["screening"]))
            figures.append((screening_eval.FIGURE, "ROC of the screening scores with the stored operating points"))
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    eval_report.write_html(out, report, figures, sections)
    return report


def _mask_scores(predicted_dir: Path, masks: Path) -> list[tuple[str, float, Path, Path]]:
    """(image id, Jaccard, predicted mask path, ground-truth mask path) for every image with both."""
    scores = []
    for predicted in sorted(predicted_dir.glob("*_segmentation.png")):
        image_id = predicted.name[: -len("_segmentation.png")]
        truth_path = find_mask(masks, image_id)
        if truth_path is not None:
            pred = _binary(predicted)
            scores.append((image_id, jaccard(pred, read_mask(truth_path, pred.shape)), predicted, truth_path))
    return scores


def _segmentation_figures(out: Path, scores, paths: dict[str, Path]) -> list[tuple[str, str]]:
    failures = []
    for image_id, score, predicted, truth_path in sorted(scores, key=lambda s: s[1])[: eval_report.FAILURES]:
        image = cv2.imread(str(paths.get(image_id, "")), cv2.IMREAD_COLOR) if image_id in paths else None
        if image is None:
            continue
        pred = _binary(predicted)
        failures.append({"id": image_id, "jaccard": score, "image": cv2.cvtColor(image, cv2.COLOR_BGR2RGB),
                         "truth": read_mask(truth_path, pred.shape), "predicted": pred})
    if not failures:
        return []
    eval_report.failures_figure(out / "segmentation_failures.png", failures)
    return [("segmentation_failures.png", f"The {len(failures)} lowest-Jaccard images")]


def _classification_figures(out: Path, ids: list[str], probs: np.ndarray, targets: np.ndarray,
                            most_confused: list[dict]) -> list[tuple[str, str]]:
    classes = list(CLASSES)
    counts = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(counts, (targets, probs.argmax(1)), 1)
    eval_report.confusion_figure(out / "confusion_matrix.png", counts, classes)
    eval_report.roc_figure(out / "roc.png", probs, targets, classes)
    eval_report.calibration_figure(out / "calibration.png", probs, targets)
    figures = [("confusion_matrix.png", "Confusion matrix"), ("roc.png", "ROC curves per class"),
               ("calibration.png", "Calibration of the top-class probability")]
    for pair in most_confused[: eval_report.PAIRS]:
        t, p = classes.index(pair["truth"]), classes.index(pair["predicted"])
        chosen = [i for i in np.argsort(-probs[:, p]) if targets[i] == t and probs[i].argmax() == p]
        examples = [{"id": ids[i], "prob": float(probs[i, p]), "image": out / "crops" / f"{ids[i]}_crop.png",
                     "heatmap": _existing(out / "explain" / f"{ids[i]}_gradcam.jpg")}
                    for i in chosen[: eval_report.EXAMPLES_PER_PAIR]]
        name = f"confused_{pair['truth']}_as_{pair['predicted']}.png"
        eval_report.confused_pair_figure(out / name, pair["truth"], pair["predicted"], examples)
        figures.append((name, f"{pair['count']} images of {pair['truth']} predicted {pair['predicted']}: "
                              "the most confident, with their heatmaps"))
    return figures


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _binary(path: Path) -> np.ndarray:
    return (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 128).astype(np.uint8)  # the scorer's threshold
