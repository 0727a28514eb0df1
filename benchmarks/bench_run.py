"""Default ``dermbatch run`` vs a per-image loop, on real images, same weights, folds and TTA.

    python -m benchmarks.bench_run --images 32 --folds 5 --tta flip --json bench_run.json
    python -m benchmarks.bench_run --images 96 --model default --json bench_run.json

Every time includes start-up (loading the models, creating sessions); the installed default bundle's
first-use engine is built before any timing.
Three ways, timed side by side in one process on the same images:
* naive loop: decode one image, run every fold on every TTA view one forward call at a time (batch 1);
* predictor, batch 1, no workers: dermbatch's Predictor with batch_size=1, workers=0;
* dermbatch run: the pipeline with its defaults (batch 8, 2 decode workers, background writer).
The first two produce the same probabilities as the third (checked and printed), so the ratio compares
equal work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import add_model_option, bench_bundle, real_images, report
from dermbatch.backends import resolve_backend_name
from dermbatch.bundle import load_bundle
from dermbatch.models import SharedBackboneFolds, load_fold_model, shares_backbone
from dermbatch.pipeline import RunOptions, run
from dermbatch.postprocess import mask_from_logits
from dermbatch.predictor import Predictor
from dermbatch.preprocess import lesion_crop, model_input
from dermbatch.tta import apply_view, invert_view, softmax, views


@torch.inference_mode()
def naive_loop(bundle_path: Path, images: list[Path], tta: str) -> dict[str, np.ndarray]:
    bundle = load_bundle(bundle_path)
    seg_spec, cls_spec = bundle.segmentation, bundle.classification
    seg_models = [load_fold_model(bundle, "segmentation", f) for f in seg_spec.folds]
    cls_models = [load_fold_model(bundle, "classification", f) for f in cls_spec.folds]
    if shares_backbone(cls_models):  # the same model work as run: the shared features once, every classifier
        shared = SharedBackboneFolds(cls_models)
        cls_models = [lambda x: shared(x).mean(0)]  # the fold mean; averaged over views below
    out = {}
    for path in images:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        x = model_input(rgb, seg_spec)[None]
        logits = np.mean([invert_view(m(torch.from_numpy(np.ascontiguousarray(apply_view(x, v)))).numpy(), v)
                          for m in seg_models for v in views(tta)], axis=0)
        mask = mask_from_logits(logits[0, 0], rgb.shape[:2], seg_spec.threshold)
        crop, _ = lesion_crop(rgb, mask, bundle.crop)
        c = model_input(crop, cls_spec)[None]
        cls_logits = np.mean([m(torch.from_numpy(np.ascontiguousarray(apply_view(c, v)))).numpy()
                              for m in cls_models for v in views(tta)], axis=0)
        out[path.stem] = softmax(cls_logits[0].astype(np.float64))
    return out


def predictor_batch1(bundle_path: Path, images: list[Path], tta: str) -> dict[str, np.ndarray]:
    with Predictor(bundle_path, tta=tta, batch_size=1, workers=0) as predictor:
        return {r.image_id: r.probabilities for r in predictor.predict(images)}


def dermbatch_run(bundle_path: Path, images: list[Path], tta: str, workdir: Path) -> dict[str, np.ndarray]:
    out = workdir / "results.csv"
    run(RunOptions(inputs=[str(p) for p in images], out=out, model=str(bundle_path), tta=tta, overwrite=True,
                   masks=workdir / "masks"))
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    return {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tta", default="flip", choices=["none", "flip", "d4"])
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    images = real_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bench_bundle(args.model, Path(tmp) / "bundle", args.folds, args.tta)
        resolve_backend_name("auto", load_bundle(bundle), "auto")  # the default bundle's first-use engine, untimed
        timings, outputs = {}, {}
        for name, fn in [("naive per-image loop", lambda: naive_loop(bundle, images, args.tta)),
                         ("predictor, batch 1, no workers", lambda: predictor_batch1(bundle, images, args.tta)),
                         ("dermbatch run (defaults)", lambda: dermbatch_run(bundle, images, args.tta, Path(tmp)))]:
            start = time.perf_counter()
            outputs[name] = fn()
            timings[name] = time.perf_counter() - start
    reference = outputs["dermbatch run (defaults)"]
    rows = []
    for name, seconds in timings.items():
        diff = max(np.abs(outputs[name][k] - reference[k]).max() for k in reference)
        rows.append({"method": name, "seconds": seconds, "images/s": len(images) / seconds,
                     "speed-up vs naive": timings["naive per-image loop"] / seconds, "max |dp| vs run": float(diff)})
    model = f" --model {args.model}" if args.model else f" --folds {args.folds}"
    report(f"dermbatch run vs per-image loop: {len(images)} HAM10000 images, {model.strip()}, TTA {args.tta}",
           rows, {"command": f"python -m benchmarks.bench_run --images {args.images}{model} --tta {args.tta}"},
           args.json)


if __name__ == "__main__":
    main()
