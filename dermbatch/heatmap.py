"""Heatmap images, numpy and OpenCV only (no torch): blending a Grad-CAM map over a crop, guided Grad-CAM as an
image, and how much of a map falls on the lesion. The writer and the report use these without importing torch."""

from __future__ import annotations

import cv2
import numpy as np

MIN_SIDE = 256  # small crops are enlarged so the heatmap stays visible


def guided_image(gradients: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Guided Grad-CAM as an RGB uint8 image: guided gradients (3, H, W) times the heatmap (H, W), contrast
    stretched around grey the usual way."""
    g = gradients * cam[None]
    g = (g - g.mean()) / (g.std() + 1e-12) * 0.15 + 0.5
    return (np.clip(g, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


def enlarge(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """``image`` scaled up (never down) so its shorter side is at least ``min_side`` pixels."""
    scale = max(1.0, min_side / min(image.shape[:2]))
    if scale == 1.0:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (values in [0, 1], any size) in the JET colour map over ``rgb``; BGR uint8 for cv2.imencode,
    enlarged to at least ``MIN_SIDE`` pixels on the shorter side."""
    bgr = enlarge(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    heat = cv2.resize(heat.astype(np.float32), (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(colour, alpha, bgr, 1 - alpha, 0)


def heat_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's mass that falls inside ``mask`` (resized to the heatmap)."""
    mask = cv2.resize(mask.astype(np.uint8), (heat.shape[1], heat.shape[0]), interpolation=cv2.INTER_NEAREST)
    total = float(heat.sum())
    return float((heat * (mask > 0)).sum() / total) if total > 0 else 0.0


COLOUR_BAR = 14  # pixels: the colour bar's width, right of the blended crop


def heatmap_figure(rgb: np.ndarray, heat: np.ndarray, caption: str) -> np.ndarray:
    """The ``--explain`` image: the blended heatmap (``blend_heatmap``), a JET colour bar on its right (heat 1 at
    the top, 0 at the bottom) and ``caption`` (the explained class and its probability) in its top-left corner.
    Its height is the blended image's, its width that plus ``COLOUR_BAR``; BGR uint8."""
    blended = blend_heatmap(rgb, heat)
    height = blended.shape[0]
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(COLOUR_BAR, axis=1)
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    figure = np.concatenate([blended, bar], axis=1)
    scale = max(0.4, height / 512)
    (w, h), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(figure, (0, 0), (w + 8, h + base + 8), (0, 0, 0), thickness=-1)
    cv2.putText(figure, caption, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return figure
