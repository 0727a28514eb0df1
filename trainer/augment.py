"""Training augmentation on uint8 RGB arrays: flips, 90° rotations, small affine, colour jitter, gamma.

Each call takes its own ``numpy.random.Generator``, seeded from (seed, epoch, index), so a resumed or
repeated run draws exactly the same augmentations.
"""

from __future__ import annotations

import cv2
import numpy as np


def geometric(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray | None = None,
              max_angle: float = 20.0, scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.05):
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], None if mask is None else mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], None if mask is None else mask[::-1]
    if image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, mask = np.rot90(image, k), None if mask is None else np.rot90(mask, k)
    if rng.random() < 0.6:
        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-max_angle, max_angle), rng.uniform(*scale))
        matrix[:, 2] += rng.uniform(-shift, shift, 2) * (w, h)
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
        if mask is not None:
            mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (w, h), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)


def photometric(rng: np.random.Generator, image: np.ndarray, strength: float = 0.1,
                gamma: tuple[float, float] = (0.8, 1.25)) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * rng.uniform(1 - strength, 1 + strength) + gray  # saturation
    x = np.clip(x, 0, 1) ** rng.uniform(*gamma)
    return (x * 255 + 0.5).astype(np.uint8)


def jitter_crop(rng: np.random.Generator, loose: np.ndarray, inner: float, jitter: float = 0.12) -> np.ndarray:
    """A random square window of ``loose`` around its central ``inner`` fraction: size and centre jittered."""
    h, w = loose.shape[:2]
    side = np.clip(inner * rng.uniform(1 - jitter, 1 + jitter), 0.3, 1.0)
    ch, cw = int(round(side * h)), int(round(side * w))
    y = int(round((h - ch) / 2 + rng.uniform(-jitter, jitter) * h))
    x = int(round((w - cw) / 2 + rng.uniform(-jitter, jitter) * w))
    y, x = min(max(0, y), h - ch), min(max(0, x), w - cw)
    return loose[y:y + ch, x:x + cw]
