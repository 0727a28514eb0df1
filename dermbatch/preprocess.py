"""The deterministic preprocessing shared by ``dermbatch run`` and ``dermbatch train``.

Both rebuild it from the bundle's manifest (input size, mean/std, crop settings), so the classifier is
trained on crops made exactly the way the pipeline makes them.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from dermbatch.bundle import CropSpec, ModelSpec, PreprocessSpec
from dermbatch.errors import UsageError
from dermbatch.postprocess import Box, expand_box, mask_bbox


def correct_colors(rgb: np.ndarray, pre: PreprocessSpec) -> np.ndarray:
    """The bundle's photometric correction: shades-of-gray colour constancy (p=6), then gamma."""
    if not pre.active:
        return rgb
    x = rgb.astype(np.float32)
    if pre.color_constancy == "shades_of_gray":
        illuminant = np.power(np.mean(np.power(x, 6.0), axis=(0, 1)), 1 / 6.0)
        illuminant = illuminant / max(float(np.linalg.norm(illuminant)), 1e-6)
        x = x / np.maximum(illuminant * np.sqrt(3.0), 1e-6)
    if pre.gamma != 1.0:
        x = 255.0 * np.power(np.clip(x / 255.0, 0, 1), 1.0 / pre.gamma)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width): area filter when shrinking, bilinear when enlarging."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    shrinking = rgb.shape[0] * rgb.shape[1] > height * width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def normalize(rgb: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (3, h, w) float32, ``(x / 255 - mean) / std``."""
    scale = 1.0 / (255.0 * np.asarray(spec.std, np.float32))
    shift = np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    out = rgb.astype(np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def model_input(rgb: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Resize to the model's input size and normalise: (3, H, W) float32."""
    return normalize(resize_rgb(rgb, spec.input_size), spec)


def scaled_crop(crop: CropSpec, scale: float) -> CropSpec:
    """The crop whose side is ``scale`` times ``crop``'s around the same lesion box (before clamping to the
    image): its margin solves ``1 + 2 * margin' = scale * (1 + 2 * margin)``. A scale below
    ``1 / (1 + 2 * margin)`` would cut into the lesion box itself and is refused."""
    if scale == 1:
        return crop
    margin = (scale * (1 + 2 * crop.margin) - 1) / 2
    if margin < -1e-9:
        raise UsageError(f"crop scale {scale:g} cuts into the lesion: the bundle's crop margin {crop.margin:g} "
                         f"allows scales of {1 / (1 + 2 * crop.margin):.3f} and more")
    return replace(crop, margin=max(0.0, margin))


def lesion_crop(rgb: np.ndarray, mask: np.ndarray | None, crop: CropSpec) -> tuple[np.ndarray, Box | None]:
    """Cut the classifier's view around the lesion; the whole image when no lesion was found.

    Returns the crop (RGB uint8) and the crop box (x, y, w, h) in ``rgb`` pixels, or None when there
    was no lesion. ``mask`` (uint8 0/1) must have ``rgb``'s height and width.
    """
    box = mask_bbox(mask) if mask is not None else None
    if box is None:
        return rgb, None
    x, y, w, h = expand_box(box, rgb.shape[:2], crop.margin, crop.square)
    patch = rgb[y:y + h, x:x + w]
    if crop.background == "mask":
        fill = np.asarray([124, 116, 104], np.uint8)  # ImageNet mean colour
        patch = np.where(mask[y:y + h, x:x + w, None] > 0, patch, fill)
    return np.ascontiguousarray(patch), (x, y, w, h)
