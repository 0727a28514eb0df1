"""Drawing the annotated image: mask contour, crop box, top-3 classes. Pure: arrays in, array out."""

from __future__ import annotations

import cv2
import numpy as np

from dermbatch.postprocess import Box

MIN_WIDTH = 480  # small images are enlarged so the text stays readable
CONTOUR_BGR = (60, 220, 60)
BOX_BGR = (0, 215, 255)
TEXT_BGR = (255, 255, 255)
ALERT_BGR = (80, 80, 255)
PANEL_BGR = (30, 30, 30)


def draw_annotation(rgb: np.ndarray, mask: np.ndarray | None, crop_box: Box | None,
                    top: list[tuple[str, float]], note: str | None = None, alert: str | None = None) -> np.ndarray:
    """Return a BGR image (ready for cv2.imencode) with the lesion outline, crop box and top classes; ``alert``
    (e.g. the ``--screen`` badge) is drawn last, in red."""
    scale = max(1.0, MIN_WIDTH / rgb.shape[1])
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale > 1.0:
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_LINEAR)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    height, width = canvas.shape[:2]
    thickness = max(1, round(width / 300))
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, CONTOUR_BGR, thickness, cv2.LINE_AA)
    if crop_box is not None:
        x, y, w, h = (round(v * scale) for v in crop_box)
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), BOX_BGR, thickness, cv2.LINE_AA)
    lines = [(f"{name} {prob * 100:5.1f}%", TEXT_BGR) for name, prob in top]
    if note:
        lines.append((note, TEXT_BGR))
    if alert:
        lines.append((alert, ALERT_BGR))
    _draw_panel(canvas, lines, font_scale=max(0.45, width / 1000))
    return canvas


def _draw_panel(canvas: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]], font_scale: float) -> None:
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(font_scale * 2))
    sizes = [cv2.getTextSize(line, font, font_scale, thickness)[0] for line, _ in lines]
    line_height = max(h for _, h in sizes) + round(10 * font_scale) + 4
    pad = round(8 * font_scale) + 2
    panel_w = max(w for w, _ in sizes) + 2 * pad
    panel_h = line_height * len(lines) + pad
    x1, y1 = min(canvas.shape[1], panel_w), min(canvas.shape[0], panel_h)
    region = canvas[:y1, :x1]
    region[:] = (region * 0.35 + np.asarray(PANEL_BGR) * 0.65).astype(np.uint8)
    for i, (line, color) in enumerate(lines):
        baseline = pad + line_height * (i + 1) - round(6 * font_scale)
        cv2.putText(canvas, line, (pad, baseline), font, font_scale, color, thickness, cv2.LINE_AA)
