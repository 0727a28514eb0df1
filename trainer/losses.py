"""Losses: segmentation BCE + soft Dice; classification cross-entropy with class weights, focal, smoothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermbatch.errors import UsageError

CLASS_WEIGHTS = ("ones", "balanced", "balanced-sqrt")


class BceDiceLoss(nn.Module):
    def __init__(self, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.dice_weight, self.smooth = dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits).flatten(1)
        target = target.flatten(1)
        dice = (2 * (prob * target).sum(1) + self.smooth) / (prob.sum(1) + target.sum(1) + self.smooth)
        return bce + self.dice_weight * (1 - dice).mean()


def class_weights(labels: list[int], num_classes: int, mode: str) -> torch.Tensor:
    """``balanced``: n / (K * count_c); ``balanced-sqrt``: its square root; ``ones``: all 1."""
    if mode not in CLASS_WEIGHTS:
        raise UsageError(f"--class-weights {mode!r}: choose {', '.join(CLASS_WEIGHTS)}")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    if mode == "ones":
        weights = np.ones(num_classes)
    elif mode == "balanced-sqrt":
        weights = np.sqrt(weights)
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Cross-entropy with optional class weights and label smoothing; ``focal_gamma > 0`` makes it focal."""

    def __init__(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.0, focal_gamma: float = 0.0):
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else None)
        self.label_smoothing, self.focal_gamma = label_smoothing, focal_gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, target, weight=self.weights, reduction="none",
                                     label_smoothing=self.label_smoothing)
        if self.focal_gamma > 0:
            p_true = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
            per_sample = per_sample * (1 - p_true).clamp(min=0) ** self.focal_gamma
        if self.weights is not None:
            return per_sample.sum() / self.weights[target].sum()
        return per_sample.mean()
