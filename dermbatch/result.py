"""``Result``: everything known about one image's trip through the pipeline, read by the writer, the report and
the explainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dermbatch.postprocess import Box


@dataclass
class Result:
    """Everything known about one image. ``image``/``mask``/``crop`` are at working resolution."""

    image_id: str
    path: Path
    classes: tuple[str, ...]
    probabilities: np.ndarray | None = None  # (K,) float, sums to 1
    lesion_found: bool = False
    bbox: Box | None = None  # crop box in original pixels
    area_fraction: float = 0.0
    lesion_probability: float | None = None  # the bundle's calibrated P(a lesion is shown), when it has one
    mask_quality: float | None = None  # calibrated P(Jaccard >= 0.65 against an expert's mask)
    error: str | None = None
    original_size: tuple[int, int] | None = None  # (height, width)
    image: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)  # uint8 0/1
    crop: np.ndarray | None = field(default=None, repr=False)
    crop_box: Box | None = None  # in working pixels
    heatmap: np.ndarray | None = field(default=None, repr=False)  # Grad-CAM, float32 [0, 1] at crop size
    guided: np.ndarray | None = field(default=None, repr=False)  # guided Grad-CAM, RGB uint8 at crop size
    screening: dict[str, str] = field(default_factory=dict)  # --screen: score and 0/1 flag columns, as written

    @property
    def suspicious(self) -> list[str]:
        """The ``--screen`` flag columns set for this image (``suspicious_mel_90``, …)."""
        return [column for column, value in self.screening.items() if column.startswith("suspicious_") and value == "1"]

    @property
    def alert(self) -> str | None:
        """The annotation's badge: ``SUSPICIOUS mel@0.90, malignant@0.95`` when a ``--screen`` point flags it."""
        names = []
        for column in self.suspicious:
            score, _, percent = column.removeprefix("suspicious_").rpartition("_")
            names.append(f"{score}@{int(percent) / 100:.2f}")
        return f"SUSPICIOUS {', '.join(names)}" if names else None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unreliable_mask(self) -> bool:
        """A lesion was found but its mask is more likely wrong than right (``mask_quality`` < 0.5)."""
        return self.lesion_found and self.mask_quality is not None and self.mask_quality < 0.5

    @property
    def label(self) -> str | None:
        return None if self.probabilities is None else self.classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float | None:
        return None if self.probabilities is None else float(np.max(self.probabilities))

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-self.probabilities)[:k]
        return [(self.classes[i], float(self.probabilities[i])) for i in order]

    def full_size_mask(self) -> np.ndarray:
        """The mask as 0/255 uint8 at the original image size (ISIC Task 1 format)."""
        height, width = self.original_size
        mask = self.mask
        if mask.shape != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return mask * np.uint8(255)
