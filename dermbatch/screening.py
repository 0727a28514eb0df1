"""Screening operating points: flag an image as suspicious when a screening score reaches a threshold chosen,
out of fold, to catch a stated share of the positives (the sensitivity), with the specificity that costs.

Two scores: ``mel`` = P(MEL), ``malignant`` = P(MEL) + P(BCC) + P(AKIEC). A point is a score and a target
sensitivity (``mel@0.90``). The bundle stores, per point, the threshold and the out-of-fold sensitivity and
specificity with lesion-grouped bootstrap 95 % intervals (``classification.screening`` in ``bundle.json``,
written by ``dermbatch operating-points``). Pure functions over arrays; numpy only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dermbatch.errors import UsageError

SCORES = {"mel": ("MEL",), "malignant": ("MEL", "BCC", "AKIEC")}
SCORE_WORDS = {"mel": "melanoma", "malignant": "malignancy"}
TARGETS = (0.80, 0.90, 0.95)
BOOTSTRAP = 2000
_SPEC = re.compile(r"^(?P<score>[a-z]+)@(?P<target>\d*\.?\d+)$")


@dataclass(frozen=True)
class OperatingPoint:
    score: str  # a key of SCORES
    target: float  # the sensitivity the threshold was chosen to reach
    threshold: float  # flag when score >= threshold
    sensitivity: float  # reached where the threshold was chosen (out of fold)
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    positives: int
    negatives: int

    @property
    def name(self) -> str:
        return f"{self.score}@{self.target:.2f}"

    @property
    def column(self) -> str:
        """The results CSV column of this point's 0/1 flag, e.g. ``suspicious_mel_90``."""
        return f"suspicious_{self.score}_{round(self.target * 100)}"

    def to_manifest(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def score_column(score: str) -> str:
    return f"score_{score}"


def screening_scores(probabilities: np.ndarray, classes: Sequence[str], score: str) -> np.ndarray:
    """(N,) screening score from (N, K) class probabilities."""
    return probabilities[:, [classes.index(c) for c in SCORES[score]]].sum(axis=1)


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest threshold at which ``scores >= threshold`` flags at least ``target`` of the positives."""
    ranked = np.sort(scores[positive])[::-1]
    if not len(ranked):
        raise ValueError("no positive example to choose a threshold from")
    return float(ranked[max(1, math.ceil(target * len(ranked) - 1e-9)) - 1])


def sensitivity_specificity(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    negatives = ~positive
    return float(flagged[positive].mean()) if positive.any() else math.nan, \
        float((~flagged[negatives]).mean()) if negatives.any() else math.nan


def bootstrap_intervals(scores: np.ndarray, positive: np.ndarray, groups: Sequence, threshold: float,
                        resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """95 % percentile intervals of (sensitivity, specificity) at ``threshold``, resampling whole groups
    (lesions) with replacement, so several images of one lesion move together."""
    _, group_index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    count = group_index.max() + 1
    flagged = scores >= threshold
    per_group = [np.bincount(group_index, weights=w, minlength=count)
                 for w in (positive & flagged, positive, ~positive & ~flagged, ~positive)]
    draws = np.random.default_rng(seed).multinomial(count, np.full(count, 1 / count), size=resamples)
    true_pos, pos, true_neg, neg = (draws @ values for values in per_group)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = true_pos / pos, true_neg / neg
    return _percentiles(sens), _percentiles(spec)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def is_positive(labels: np.ndarray, classes: Sequence[str], score: str) -> np.ndarray:
    """Which examples a score should flag, from class indices."""
    return np.isin(labels, [classes.index(c) for c in SCORES[score]])


def choose_points(probabilities: np.ndarray, labels: np.ndarray, groups: Sequence, classes: Sequence[str],
                  targets: Iterable[float] = TARGETS, resamples: int = BOOTSTRAP,
                  seed: int = 0) -> list[OperatingPoint]:
    """For each score and target sensitivity: the threshold from these (out-of-fold) predictions, and the
    sensitivity and specificity it reaches with lesion-grouped bootstrap intervals (a score none of these
    examples is positive or negative for has no points)."""
    points = []
    for score in SCORES:
        values, positive = screening_scores(probabilities, classes, score), is_positive(labels, classes, score)
        if positive.all() or not positive.any():
            continue
        for target in targets:
            threshold = threshold_for_sensitivity(values, positive, target)
            sens, spec = sensitivity_specificity(values, positive, threshold)
            sens_ci, spec_ci = bootstrap_intervals(values, positive, groups, threshold, resamples, seed)
            points.append(OperatingPoint(score, float(target), threshold, sens, sens_ci, spec, spec_ci,
                                         int(positive.sum()), int((~positive).sum())))
    return points


def points_from_manifest(section: dict | None) -> tuple[OperatingPoint, ...]:
    """``classification.screening`` of bundle.json -> points (KeyError/TypeError/ValueError when malformed)."""
    if section is None:
        return ()
    points = []
    for entry in section["points"]:
        point = OperatingPoint(**{k: tuple(float(x) for x in v) if k.endswith("_ci") else v
                                  for k, v in entry.items()})
        if point.score not in SCORES or not 0 < point.target < 1 or len(point.sensitivity_ci) != 2 \
                or not all(isinstance(v, (int, float)) for v in (point.threshold, point.sensitivity,
                                                                  point.specificity)):
            raise ValueError(f"bad operating point {entry}")
        points.append(point)
    return tuple(points)


def parse_screen(specs: Iterable[str]) -> list[tuple[str, float]]:
    """``--screen mel@0.90 malignant@0.95`` -> [(score, target)], checked before any image is read."""
    wanted = []
    for spec in specs:
        match = _SPEC.match(spec.strip().lower())
        if match is None or match["score"] not in SCORES:
            raise UsageError(f"--screen {spec!r}: give SCORE@SENSITIVITY with SCORE one of {', '.join(SCORES)}, "
                             "e.g. mel@0.90")
        target = float(match["target"])
        if not 0 < target < 1:
            raise UsageError(f"--screen {spec!r}: the sensitivity must be between 0 and 1, e.g. mel@0.90")
        wanted.append((match["score"], target))
    return list(dict.fromkeys(wanted))


def select_points(specs: Iterable[str], stored: Sequence[OperatingPoint], bundle_path) -> tuple[OperatingPoint, ...]:
    """The bundle's stored points that ``--screen`` names; a one-line UsageError for any it does not store."""
    wanted = parse_screen(specs)
    if wanted and not stored:
        raise UsageError(f"--screen: bundle {bundle_path} stores no screening operating points; add them with "
                         f"`dermbatch operating-points --model {bundle_path} …`")
    chosen = []
    for score, target in wanted:
        point = next((p for p in stored if p.score == score and abs(p.target - target) < 1e-9), None)
        if point is None:
            raise UsageError(f"--screen {score}@{target:.2f}: not stored in bundle {bundle_path}; stored: "
                             f"{', '.join(p.name for p in stored)}")
        chosen.append(point)
    return tuple(chosen)


def result_columns(points: Sequence[OperatingPoint]) -> tuple[str, ...]:
    """The results CSV columns ``--screen`` adds: each score once, then each point's 0/1 flag."""
    scores = dict.fromkeys(p.score for p in points)
    return (*(score_column(s) for s in scores), *(p.column for p in points))


def screen_values(probabilities: np.ndarray, classes: Sequence[str],
                  points: Sequence[OperatingPoint]) -> dict[str, str]:
    """One image's values of ``result_columns(points)``, as the CSV shows them."""
    scores = {s: float(screening_scores(probabilities[None], classes, s)[0]) for s in dict.fromkeys(
        p.score for p in points)}
    return {**{score_column(s): f"{v:.6f}" for s, v in scores.items()},
            **{p.column: "1" if scores[p.score] >= p.threshold else "0" for p in points}}


def summary_line(point: OperatingPoint, flagged: int, total: int) -> str:
    """'37 of 1,504 flagged as suspicious for melanoma at sensitivity 0.90; expected specificity 0.64 [0.60,
    0.68] from training'."""
    low, high = point.specificity_ci
    return (f"{flagged:,} of {total:,} flagged as suspicious for {SCORE_WORDS[point.score]} at sensitivity "
            f"{point.target:.2f}; expected specificity {point.specificity:.2f} [{low:.2f}, {high:.2f}] from training")
