"""How far to trust a predicted mask: shape and confidence statistics of the segmentation, and the bundle's
calibrated logistic models over them.

``mask_features`` reads the fold- and view-averaged segmentation logits at model resolution (what every
backend returns) and the mask made from them. A bundle may carry ``segmentation.quality`` (fitted by
``dermbatch calibrate-masks``): two logistic regressions over standardised features,

- ``reliable``: the probability that the mask's Jaccard against an expert's mask is at least 0.65 (the
  ISIC threshold below which a mask scores 0) — reported as ``mask_quality``;
- ``lesion``: the probability that the image shows a lesion at all; below the bundle's threshold the mask is
  dropped and the whole image is classified (``lesion_found=false``), as when the segmentation finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("area_fraction", "logit_area_fraction", "mean_prob_inside", "mean_prob_outside", "uncertain_ratio",
            "border_fraction", "solidity", "component_share", "mean_abs_logit_inside", "edge_contrast")
MODELS = ("reliable", "lesion")


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def mask_features(logits: np.ndarray, threshold: float) -> np.ndarray:
    """(len(FEATURES),) float64 statistics of one (h, w) logit map and the mask ``run`` makes from it."""
    import cv2  # here, not at import: reading a bundle's manifest stays light

    from dermbatch.postprocess import fill_holes, largest_component

    logits = np.asarray(logits, np.float32)
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))
    raw = (prob > threshold).astype(np.uint8)
    mask = fill_holes(largest_component(raw)) if raw.any() else raw
    inside = mask > 0
    area = float(inside.mean())
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    mean_in = float(prob[inside].mean()) if n_in else 0.0
    mean_out = float(prob[~inside].mean()) if n_out else 0.0
    uncertain = float(((prob > 0.2) & (prob < 0.8)).sum())
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    solidity = component_share = 0.0
    if n_in:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
        solidity = min(1.0, n_in / max(hull, 1.0))
        component_share = float((raw & mask).sum()) / max(float(raw.sum()), 1.0)
    ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.erode(mask, np.ones((5, 5), np.uint8))
    edge = float(np.abs(logits[ring > 0]).mean()) if ring.any() else 0.0
    return np.asarray([
        area,
        _logit(area),
        mean_in,
        mean_out,
        uncertain / (n_in + uncertain + 1.0),
        float(border.mean()),
        solidity,
        component_share,
        float(np.abs(logits[inside]).mean()) if n_in else 0.0,
        edge,
    ], np.float64)


@dataclass(frozen=True)
class QualityModel:
    """The bundle's ``segmentation.quality``: feature standardisation and one logistic model per name."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: dict[str, tuple[np.ndarray, float]]  # name -> (coefficients, intercept)
    thresholds: dict[str, float]  # name -> decision threshold on its probability

    @classmethod
    def from_manifest(cls, section: dict | None) -> QualityModel | None:
        if not section:
            return None
        features = tuple(section["features"])
        if features != FEATURES:
            raise ValueError(f"segmentation.quality uses features {list(features)}; this dermbatch computes "
                             f"{list(FEATURES)}: refit it with `dermbatch calibrate-masks`")
        n = len(features)
        weights, thresholds = {}, {}
        for name in MODELS:
            coef = np.asarray(section[name]["coef"], np.float64)
            if coef.shape != (n,):
                raise ValueError(f"segmentation.quality.{name}.coef must have {n} numbers")
            weights[name] = (coef, float(section[name]["intercept"]))
            thresholds[name] = float(section[name]["threshold"])
            if not 0 < thresholds[name] < 1:
                raise ValueError(f"segmentation.quality.{name}.threshold must be strictly between 0 and 1")
        mean, scale = np.asarray(section["mean"], np.float64), np.asarray(section["scale"], np.float64)
        if mean.shape != (n,) or scale.shape != (n,) or not (scale > 0).all():
            raise ValueError(f"segmentation.quality mean/scale must have {n} numbers (scale > 0)")
        return cls(features, mean, scale, weights, thresholds)

    def to_manifest(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                **{name: {"coef": coef.tolist(), "intercept": intercept, "threshold": self.thresholds[name]}
                   for name, (coef, intercept) in self.weights.items()}}

    def probabilities(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """name -> probability for each row of ``features`` ((N, len(FEATURES)) or one row)."""
        z = (np.atleast_2d(features) - self.mean) / self.scale
        return {name: 1.0 / (1.0 + np.exp(-(z @ coef + intercept)))
                for name, (coef, intercept) in self.weights.items()}
