"""Mask post-processing and lesion-box maths: pure functions on arrays, no I/O."""

from __future__ import annotations

import math

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def mask_from_logits(logits: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """Logit map (h, w) at model resolution -> clean binary mask (uint8 0/1) of ``size`` (height, width).

    The logits are resized bilinearly before thresholding (smooth borders), then only the largest
    connected component is kept and its holes are filled.
    """
    height, width = size
    resized = cv2.resize(np.ascontiguousarray(logits, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    mask = (resized > logit(threshold)).astype(np.uint8)
    return fill_holes(largest_component(mask))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected foreground component (ties: the first found)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 2:  # background only, or a single component
        return mask
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == keep).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    out = mask.copy()
    out[holes] = 1
    return out


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Tight bounding box (x, y, w, h) of the foreground, or None when the mask is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def expand_box(box: Box, image_size: tuple[int, int], margin: float, square: bool) -> Box:
    """Grow ``box`` by ``margin`` x its size on each side (and to a square), clamped to the image."""
    x, y, w, h = box
    height, width = image_size
    cx, cy = x + w / 2.0, y + h / 2.0
    bw, bh = w * (1 + 2 * margin), h * (1 + 2 * margin)
    if square:
        bw = bh = max(bw, bh)
    side_w, side_h = math.ceil(bw - 1e-9), math.ceil(bh - 1e-9)  # whole pixels, decided once: a square stays square
    x0, y0 = math.floor(cx - side_w / 2), math.floor(cy - side_h / 2)
    x1, y1 = min(width, x0 + side_w), min(height, y0 + side_h)
    x0, y0 = max(0, x0), max(0, y0)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Map a box between two resolutions of the same image (sizes as (height, width))."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x, y, w, h = box
    x0, y0 = int(round(x * sx)), int(round(y * sy))
    x1, y1 = min(to_size[1], int(round((x + w) * sx))), min(to_size[0], int(round((y + h) * sy)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)
