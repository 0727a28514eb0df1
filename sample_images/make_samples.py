"""Generate the synthetic dermoscopy-like sample images in this folder (deterministic, seed 2018).

    python sample_images/make_samples.py

They demonstrate the workflow only: they are drawn, not photographed, and predictions on them mean nothing
clinically. (The real data sets' licence, CC BY-NC, forbids shipping their images here.)
Each image: a skin-tone background with texture, the dark circular field of view of a contact dermoscope,
one pigmented lesion of irregular outline and mottled colour (or none), and a few hairs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
SKIN = [(196, 160, 140), (220, 180, 160), (170, 130, 105), (205, 150, 135), (150, 105, 80)]  # RGB
PIGMENT = [(95, 60, 40), (120, 80, 55), (60, 40, 35), (140, 95, 80), (150, 60, 70), (80, 55, 70)]
# name, size (w, h), skin, pigment or None, lesion radius fraction, hairs
SAMPLES = [
    ("sample_01_nevus_like.jpg", (600, 450), 0, 0, 0.22, 2),
    ("sample_02_dark_irregular.jpg", (600, 450), 1, 2, 0.30, 0),
    ("sample_03_small_light.jpg", (600, 450), 3, 3, 0.12, 3),
    ("sample_04_reddish.jpg", (600, 450), 1, 4, 0.20, 1),
    ("sample_05_darker_skin.jpg", (600, 450), 4, 5, 0.25, 4),
    ("sample_06_hairy.jpg", (600, 450), 2, 1, 0.18, 12),
    ("sample_07_no_lesion.jpg", (600, 450), 0, None, 0.0, 2),
    ("sample_08_large_lesion.jpg", (600, 450), 3, 0, 0.40, 1),
    ("sample_09_lossless.png", (512, 384), 1, 1, 0.2, 2),
    ("sample_10_large_photo.jpg", (3000, 2250), 0, 2, 0.2, 5),
]


def skin(rng, size, tone):
    w, h = size
    noise = cv2.resize(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32), (w, h))
    image = np.asarray(SKIN[tone], np.float32)[None, None] * (1 + 0.04 * noise[..., None])
    return image + rng.normal(0, 3, image.shape)


def lesion_mask(rng, size, radius_fraction):
    w, h = size
    theta = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    radius = radius_fraction * min(w, h) * (1 + sum(rng.uniform(0, 0.12) * np.sin(k * theta + rng.uniform(0, 6.3))
                                                 for k in range(2, 7)))
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    points = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], 1).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [points], 255)
    return cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.01 * min(w, h))).astype(np.float32) / 255


def paint_lesion(rng, image, alpha, pigment):
    h, w = alpha.shape
    mottle = cv2.resize(rng.normal(0, 1, (h // 24 + 1, w // 24 + 1)).astype(np.float32), (w, h))
    colour = np.asarray(PIGMENT[pigment], np.float32)[None, None] * (1 + 0.18 * mottle[..., None])
    dots = (rng.random((h, w)) < 0.002).astype(np.float32)
    dots = cv2.GaussianBlur(dots, (0, 0), max(1.0, 0.004 * w)) * 40
    colour = colour * (1 - np.clip(dots, 0, 0.6))[..., None]
    return image * (1 - alpha[..., None]) + colour * alpha[..., None]


def hairs(rng, image, count):
    h, w = image.shape[:2]
    for _ in range(count):
        p0 = rng.uniform(0, 1, 2) * (w, h)
        p1 = p0 + rng.normal(0, 0.35, 2) * (w, h)
        ctrl = (p0 + p1) / 2 + rng.normal(0, 0.1, 2) * (w, h)
        t = np.linspace(0, 1, 60)[:, None]
        curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p1).astype(np.int32)
        cv2.polylines(image, [curve], False, (40, 30, 25), max(1, w // 400), cv2.LINE_AA)
    return image


def vignette(image):
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((xx - w / 2) / (0.62 * w), (yy - h / 2) / (0.62 * w))
    return image * np.clip(1.6 - 1.2 * r, 0.05, 1)[..., None]


def make(name, size, tone, pigment, radius, hair_count, rng):
    image = skin(rng, size, tone)
    if pigment is not None:
        image = paint_lesion(rng, image, lesion_mask(rng, size, radius), pigment)
    image = vignette(hairs(rng, np.clip(image, 0, 255).astype(np.float32), hair_count))
    bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(HERE / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 88] if name.endswith(".jpg") else [])


def main():
    rng = np.random.default_rng(2018)
    for sample in SAMPLES:
        make(*sample, rng)
        print(HERE / sample[0])


if __name__ == "__main__":
    main()
