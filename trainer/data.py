"""Training data: image lists from folders and label CSVs, and the official ISIC 2018 layout.

Labels CSV: an ``image`` or ``image_id`` column; the class as a ``label`` column (MEL, NV, …) or as one-hot
ISIC columns; lesion grouping from ``lesion_id`` when present. Masks are ``<id>_segmentation.png`` (ISIC)
or ``<id>.png``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dermbatch.bundle import CLASSES
from dermbatch.errors import UsageError
from dermbatch.inputs import discover_inputs

OFFICIAL = {
    "seg_images": "ISIC2018_Task1-2_Training_Input",
    "seg_masks": "ISIC2018_Task1_Training_GroundTruth",
    "cls_images": "ISIC2018_Task3_Training_Input",
    "cls_labels": "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
    "cls_groups": "ISIC2018_Task3_Training_LesionGroupings.csv",
}


@dataclass(frozen=True)
class Item:
    image_id: str
    image: Path
    mask: Path | None = None
    label: int | None = None
    group: str | None = None


def find_mask(masks_dir: Path, image_id: str) -> Path | None:
    for name in (f"{image_id}_segmentation.png", f"{image_id}.png"):
        if (masks_dir / name).is_file():
            return masks_dir / name
    return None


def seg_items(images_dir: Path, masks_dir: Path) -> list[Item]:
    items, missing = [], []
    for entry in discover_inputs([images_dir]):
        mask = find_mask(masks_dir, entry.image_id)
        if mask is None:
            missing.append(entry.image_id)
        else:
            items.append(Item(entry.image_id, entry.path, mask))
    if missing:
        raise UsageError(f"{masks_dir}: no mask for {len(missing)} images (e.g. {missing[0]}_segmentation.png)")
    return items


def read_labels(labels_csv: Path, groups_csv: Path | None = None) -> dict[str, tuple[int, str | None]]:
    """image id -> (class index, lesion id or None)."""
    try:
        rows = list(csv.DictReader(open(labels_csv, encoding="utf-8-sig")))
    except OSError as exc:
        raise UsageError(f"--labels {labels_csv}: cannot read ({exc.strerror})") from None
    if not rows:
        raise UsageError(f"--labels {labels_csv}: no rows")
    id_column = next((c for c in ("image", "image_id") if c in rows[0]), None)
    if id_column is None:
        raise UsageError(f"--labels {labels_csv}: needs an 'image' or 'image_id' column")
    groups = {}
    if groups_csv is not None and groups_csv.is_file():
        groups = {r["image"]: r["lesion_id"] for r in csv.DictReader(open(groups_csv, encoding="utf-8-sig"))}
    out = {}
    for line, row in enumerate(rows, start=2):
        if "isic2017_label" in row and not row["isic2017_label"]:
            continue  # ISIC 2018 Task 1 labels.csv: no ISIC 2017 diagnosis for this image
        out[row[id_column]] = (_label_index(row, labels_csv, line), row.get("lesion_id") or groups.get(row[id_column]))
    return out


ISIC2017_CLASSES = {"melanoma": "MEL", "seborrheic_keratosis": "BKL", "nevus": "NV"}


def _label_index(row: dict, path: Path, line: int) -> int:
    if row.get("isic2017_label"):  # ISIC 2017 diagnoses, in ISIC 2018 Task 3 classes
        if row["isic2017_label"] not in ISIC2017_CLASSES:
            raise UsageError(f"{path}:{line}: isic2017_label {row['isic2017_label']!r} is not one of "
                             f"{', '.join(ISIC2017_CLASSES)}")
        return CLASSES.index(ISIC2017_CLASSES[row["isic2017_label"]])
    if row.get("label"):
        if row["label"] not in CLASSES:
            raise UsageError(f"{path}:{line}: label {row['label']!r} is not one of {', '.join(CLASSES)}")
        return CLASSES.index(row["label"])
    try:
        values = [float(row[c]) for c in CLASSES]
    except (KeyError, ValueError):
        raise UsageError(f"{path}:{line}: needs a 'label' column or one-hot columns {','.join(CLASSES)}") from None
    return max(range(len(values)), key=values.__getitem__)


def cls_items(images_dir: Path, labels_csv: Path, masks_dir: Path | None = None,
              groups_csv: Path | None = None) -> list[Item]:
    labels = read_labels(labels_csv, groups_csv)
    items = []
    for entry in discover_inputs([images_dir]):
        if entry.image_id in labels:
            label, group = labels[entry.image_id]
            mask = find_mask(masks_dir, entry.image_id) if masks_dir else None
            items.append(Item(entry.image_id, entry.path, mask, label, group))
    if not items:
        raise UsageError(f"no image in {images_dir} has a row in {labels_csv}")
    return items


def official_paths(data_dir: Path) -> dict[str, Path]:
    paths = {key: data_dir / rel for key, rel in OFFICIAL.items()}
    missing = [str(p) for key, p in paths.items() if key != "cls_groups" and not p.exists()]
    if missing:
        raise UsageError(f"--data {data_dir}: not the official ISIC 2018 layout, missing {missing[0]}; "
                         "or use --task seg|cls with --images/--masks/--labels")
    return paths
