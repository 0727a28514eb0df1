"""``dermbatch evaluate`` on labelled data: does each stored screening point keep its promise here?

For every operating point the bundle stores, the sensitivity and specificity its threshold reaches on these
images, with bootstrap 95 % intervals resampled by lesion (by image when the labels have no lesion ids),
beside the out-of-fold values promised at training time; and the ROC curve of both screening scores with
the points marked. This is how a clinic checks the thresholds on its own images before relying on them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dermbatch.bundle import CLASSES
from dermbatch.screening import (
    SCORE_WORDS,
    SCORES,
    OperatingPoint,
    bootstrap_intervals,
    is_positive,
    screening_scores,
    sensitivity_specificity,
)

FIGURE = "screening_roc.png"


def check_points(points: Sequence[OperatingPoint], probs: np.ndarray, targets: np.ndarray,
                 groups: Sequence[str]) -> dict:
    """{point name: {threshold, promised: {...}, reached: {...}}} and each score's AUC on these images."""
    from sklearn.metrics import roc_auc_score

    report: dict = {"grouped_by": "lesion_id" if len(set(groups)) < len(groups) else "image", "points": {},
                    "auc": {}}
    for score in SCORES:
        positive = is_positive(targets, CLASSES, score)
        if positive.any() and not positive.all():
            report["auc"][score] = float(roc_auc_score(positive, screening_scores(probs, CLASSES, score)))
    for point in points:
        values, positive = screening_scores(probs, CLASSES, point.score), is_positive(targets, CLASSES, point.score)
        sens, spec = sensitivity_specificity(values, positive, point.threshold)
        sens_ci, spec_ci = bootstrap_intervals(values, positive, groups, point.threshold)
        report["points"][point.name] = {
            "threshold": point.threshold,
            "promised": {"sensitivity": point.sensitivity, "sensitivity_ci": list(point.sensitivity_ci),
                         "specificity": point.specificity, "specificity_ci": list(point.specificity_ci)},
            "reached": {"sensitivity": sens, "sensitivity_ci": list(sens_ci), "specificity": spec,
                        "specificity_ci": list(spec_ci), "positives": int(positive.sum()),
                        "negatives": int((~positive).sum()), "flagged": int((values >= point.threshold).sum())}}
    return report


def roc_figure(path: Path, probs: np.ndarray, targets: np.ndarray, points: Sequence[OperatingPoint]) -> None:
    """ROC of the melanoma and malignancy scores, each stored point where it lands on these images (filled)
    and where training promised it (open)."""
    from sklearn.metrics import auc, roc_curve

    from trainer.eval_report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for score, color in zip(SCORES, ("#ad1457", "#1565c0"), strict=False):
        values, positive = screening_scores(probs, CLASSES, score), is_positive(targets, CLASSES, score)
        if not positive.any() or positive.all():
            continue
        fpr, tpr, _ = roc_curve(positive, values)
        ax.plot(fpr, tpr, color=color, label=f"{SCORE_WORDS[score]} score (AUC {auc(fpr, tpr):.3f})")
        for point in (p for p in points if p.score == score):
            sens, spec = sensitivity_specificity(values, positive, point.threshold)
            ax.plot(1 - spec, sens, "o", color=color)
            ax.plot(1 - point.specificity, point.sensitivity, "o", mfc="none", color=color)
            ax.annotate(point.name, (1 - spec, sens), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("Screening scores (filled: reached here; open: promised out of fold)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html_table(report: dict) -> str:
    """The points' promised and reached sensitivity and specificity, as an HTML table."""
    def cell(values: dict, key: str) -> str:
        low, high = values[f"{key}_ci"]
        return f"<td>{values[key]:.3f} [{low:.3f}, {high:.3f}]</td>"

    rows = ["<h2>Screening operating points</h2><p>Promised: out of fold at training time. Reached: on these "
            f"images (95 % bootstrap intervals, resampled by {html.escape(report['grouped_by'])}).</p><table><tr>"
            "<th>point</th><th>threshold</th><th>sensitivity promised</th><th>reached</th>"
            "<th>specificity promised</th><th>reached</th><th>flagged</th></tr>"]
    for name, point in report["points"].items():
        promised, reached = point["promised"], point["reached"]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{point['threshold']:.4f}</td>{cell(promised, 'sensitivity')}"
                    f"{cell(reached, 'sensitivity')}{cell(promised, 'specificity')}{cell(reached, 'specificity')}"
                    f"<td>{reached['flagged']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
