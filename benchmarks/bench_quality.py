"""Quality of the reduced-precision CPU engines against ONNX Runtime fp32, scored the ISIC way on labelled images.

    python -m benchmarks.bench_quality --model default --cls-images 420 --seg-images 200 --json bench_quality.json

Every engine runs ``dermbatch evaluate`` on the same images: HAM10000 images spread evenly over the seven classes
(balanced multiclass accuracy) and ISIC 2018 Task 1 images with masks (thresholded Jaccard). The target is the
difference to fp32 in points; the absolute numbers are optimistic when the bundle was trained on these images
(the default bundle's folds together saw all of them), so read them only side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DATA, add_model_option, ensure_engine, real_images, report
from dermbatch.bundle import CLASSES, load_bundle

ENGINES = ("onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:bf16")


def per_class_images(count: int) -> list[Path]:
    """About ``count`` HAM10000 images, the same number from each class (all of a class that has fewer)."""
    with open(DATA / "ham10000" / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["image_id"])
    chosen = []
    for name in CLASSES:
        ids = [r["image_id"] for r in rows if r["label"] == name]
        step = max(1, len(ids) // (count // len(CLASSES)))
        chosen += ids[::step][: count // len(CLASSES)]
    return [DATA / "ham10000" / "images" / f"{i}.jpg" for i in chosen]


def linked_folder(folder: Path, images: list[Path]) -> Path:
    """A folder of symlinks: ``dermbatch evaluate`` reads one folder, and the images are never copied."""
    folder.mkdir(parents=True)
    for image in images:
        (folder / image.name).symlink_to(image.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cls-images", type=int, default=420)
    parser.add_argument("--seg-images", type=int, default=200)
    parser.add_argument("--engines", default=",".join(ENGINES), help="target:precision list; the first is the "
                                                                      "reference")
    parser.add_argument("--tta", default="none")
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    from engines.calibration import calibration_inputs
    from trainer.evaluate import evaluate

    engines = args.engines.split(",")
    cls_images = per_class_images(args.cls_images)
    held_out = set(cls_images)
    calibration_images = [p for p in real_images(64 + len(cls_images)) if p not in held_out][:64]
    seg_images = real_images(args.seg_images, "isic2018_task1")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DERMBATCH_CACHE"] = str(tmp / "cache")  # engines of an installed bundle stay here
        bundle = load_bundle(None if args.model in (None, "default") else args.model)
        calibration = calibration_inputs(bundle.path, calibration_images, limit=64)
        cls_dir, seg_dir = linked_folder(tmp / "cls", cls_images), linked_folder(tmp / "seg", seg_images)
        for engine in engines:
            backend, precision = ensure_engine(bundle, engine, calibration)
            options = dict(backend=backend, precision=precision, tta=args.tta)
            start = time.perf_counter()
            cls = evaluate(str(bundle.path), cls_dir, tmp / engine / "cls", labels=DATA / "ham10000" / "labels.csv",
                           explain=False, **options)
            seg = evaluate(str(bundle.path), seg_dir, tmp / engine / "seg", masks=DATA / "isic2018_task1" / "masks",
                           explain=False, **options)
            seconds = time.perf_counter() - start
            results[engine] = (_probabilities(tmp / engine / "cls"), tmp / engine / "seg" / "masks")
            rows.append({"engine": engine, "balanced accuracy": cls["classification"]["balanced_accuracy"],
                         "macro AUC": cls["classification"]["macro_auc"],
                         "thresholded Jaccard": seg["segmentation"]["thresholded_jaccard"],
                         "seconds": seconds})
    reference = rows[0]
    for row, engine in zip(rows, engines, strict=True):
        row["BA loss (points)"] = 100 * (reference["balanced accuracy"] - row["balanced accuracy"])
        row["TJ loss (points)"] = 100 * (reference["thresholded Jaccard"] - row["thresholded Jaccard"])
        row["top-1 agreement"] = _agreement(results[engines[0]][0], results[engine][0])
    model = f" --model {args.model}" if args.model else ""
    extra = {"command": f"python -m benchmarks.bench_quality{model} --cls-images {args.cls_images} "
                        f"--seg-images {args.seg_images} --engines {args.engines} --tta {args.tta}",
             "images": {"classification": len(cls_images), "segmentation": len(seg_images)}}
    report(f"Engine quality vs {engines[0]}: {len(cls_images)} HAM10000 images (balanced over classes), "
           f"{len(seg_images)} ISIC 2018 Task 1 images, TTA {args.tta}", rows, extra, args.json)


def _probabilities(folder: Path) -> dict[str, np.ndarray]:
    from dermbatch.outputs import read_complete_rows

    return {r["image"]: np.array([float(r[c]) for c in CLASSES])
            for r in read_complete_rows(folder / "predictions.csv")}


def _agreement(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    return float(np.mean([reference[k].argmax() == other[k].argmax() for k in reference]))


if __name__ == "__main__":
    main()
