"""``run --report DIR``: a static, self-contained HTML report (``index.html`` + ``thumbs/``).

Thumbnails are written as results arrive (by the output writer); the page is built at the end of the run
from the results and details CSVs, so a resumed run reports every image, old and new. The data travels as
JSON inside the page and a small script renders one page of cards at a time, so 10,000 images stay
usable; nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from dermbatch.annotate import draw_annotation
from dermbatch.heatmap import blend_heatmap
from dermbatch.outputs import output_path, read_complete_rows, write_bytes_atomic
from dermbatch.screening import SCORE_WORDS, OperatingPoint

THUMB_WIDTH = 240
LOW_CONFIDENCE = 0.5  # flagged below this top-class probability
THUMB_KINDS = {"annotated": "_annotated.jpg", "mask": "_mask.jpg", "heatmap": "_gradcam.jpg"}
MASK_TINT_BGR = np.array([60, 220, 60], np.float32)


def _thumb(bgr: np.ndarray) -> np.ndarray:
    scale = THUMB_WIDTH / bgr.shape[1]
    size = (THUMB_WIDTH, max(1, round(bgr.shape[0] * scale)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def mask_overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask tinted green and outlined: BGR uint8."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    inside = mask.astype(bool)
    tinted = bgr.astype(np.float32)
    tinted[inside] = tinted[inside] * 0.6 + MASK_TINT_BGR * 0.4
    out = tinted.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (60, 220, 60), max(1, round(bgr.shape[1] / 250)), cv2.LINE_AA)
    return out


def thumbnails(result) -> dict[str, np.ndarray]:
    """The report's thumbnails of one good result (BGR, ``THUMB_WIDTH`` wide), by kind."""
    note = "unreliable mask" if result.unreliable_mask else None if result.lesion_found else "no lesion found"
    images = {"annotated": draw_annotation(result.image, result.mask, result.crop_box, result.top(3), note,
                                           result.alert),
              "mask": mask_overlay(result.image, result.mask)}
    if result.heatmap is not None:
        images["heatmap"] = blend_heatmap(result.crop, result.heatmap)
    return {kind: _thumb(image) for kind, image in images.items()}


def thumb_path(folder: Path, image_id: str, kind: str) -> Path:
    return output_path(folder / "thumbs", image_id, THUMB_KINDS[kind])


def _rows(path: Path) -> list[dict[str, str]]:
    return read_complete_rows(path) if path.exists() else []


def report_entries(folder: Path, results_csv: Path, details_csv: Path, classes: tuple[str, ...],
                   points: Sequence[OperatingPoint] = ()) -> list[dict]:
    """One compact record per image (the last details row of each), with the thumbnails that exist and the
    ``--screen`` points that flag it."""
    probabilities = {row["image"]: row for row in _rows(results_csv)}
    details = {row["image"]: row for row in _rows(details_csv)}  # a resumed image: its last row wins
    entries = []
    for image_id, row in details.items():
        entry = {"id": image_id, "path": row.get("path", ""), "error": row.get("error", "")}
        probs = probabilities.get(image_id)
        if row.get("status") == "ok" and probs is not None:
            values = [(name, float(probs[name])) for name in classes]
            values.sort(key=lambda item: -item[1])
            entry.update(pred=values[0][0], conf=round(values[0][1], 4), top=[[n, round(p, 4)] for n, p in values[:3]],
                         lesion=row.get("lesion_found") == "true")
            if row.get("mask_quality"):
                entry["mq"] = round(float(row["mask_quality"]), 4)
            entry["sus"] = [p.name for p in points if probs.get(p.column) == "1"]
        thumbs = {}
        for kind in THUMB_KINDS:
            path = thumb_path(folder, image_id, kind)
            if path.exists():
                thumbs[kind] = path.relative_to(folder).as_posix()
        entry["thumbs"] = thumbs
        entries.append(entry)
    return entries


def write_report(folder: Path, results_csv: Path, details_csv: Path, classes: tuple[str, ...],
                 meta: dict[str, str], points: Sequence[OperatingPoint] = ()) -> Path:
    """Write ``folder/index.html`` for every image in the CSVs; returns its path."""
    entries = report_entries(folder, results_csv, details_csv, classes, points)
    template = resources.files("dermbatch").joinpath("templates/report.html").read_text(encoding="utf-8")
    meta = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **meta}
    meta_html = " · ".join(f"{html.escape(k)}: <b>{html.escape(str(v))}</b>" for k, v in meta.items())
    screen = [{"name": p.name, "label": f"suspicious for {SCORE_WORDS[p.score]} at sensitivity {p.target:.2f}"}
              for p in points]
    data = json.dumps({"classes": list(classes), "low_confidence": LOW_CONFIDENCE, "screen": screen,
                       "images": entries},
                      separators=(",", ":")).replace("<", "\\u003c")  # no tag can start inside the <script>
    page = template.replace("__META__", meta_html).replace("__DATA__", data)
    path = folder / "index.html"
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
