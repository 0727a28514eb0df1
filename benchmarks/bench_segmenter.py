"""Segmenters side by side on the same held-out ISIC 2018 Task 1 images: mask quality against cost.

For each bundle and setting (input size x TTA): the thresholded Jaccard (ISIC 2018: an image's Jaccard below
0.65 counts 0), the mean Jaccard, the segmentation speed (torch on this CPU, images/s, the model's forward
passes only) and the weight of one fold. Every bundle is scored with its fold ``--fold`` model on the images
its own ``splits.json`` holds out for that fold, so no score comes from an image the model was trained on;
bundles compared must therefore share the split (a new segmenter trained with a copy of the old
``splits.json``). Masks are made exactly as ``dermbatch run`` makes them (``dermbatch.predictor.segment_images``)
and scored at the image's own size against the expert mask.

    python -m benchmarks.bench_segmenter --bundle default --bundle runs/seg192 --images 400 --sizes 128,192,256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA, report
from dermbatch.bundle import load_bundle
from dermbatch.imageio import decode_image
from dermbatch.models import load_fold_model
from dermbatch.predictor import segment_images
from dermbatch.preprocess import correct_colors
from trainer.dataset import read_mask
from trainer.metrics import jaccard


def held_out(bundle, fold: int, count: int) -> list[str]:
    fold_of = json.loads((bundle.path / "splits.json").read_text())["segmentation"]["fold_of"]
    ids = sorted(i for i, f in fold_of.items() if f == fold)
    return [ids[i * len(ids) // count] for i in range(min(count, len(ids)))]


def score(bundle, fold: int, size: int, tta: str, images: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    spec = dataclasses.replace(bundle.spec("segmentation"), input_size=(size, size))
    model = load_fold_model(bundle, "segmentation", fold).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).numpy()[None]

    masks, start = [], time.perf_counter()
    for first in range(0, len(images), 8):
        masks += segment_images(forward, spec, images[first:first + 8], tta)
    seconds = time.perf_counter() - start
    scores = np.array([jaccard(m, t) for m, t in zip(masks, truths, strict=True)])
    return {"thr. Jaccard": float(np.where(scores < 0.65, 0, scores).mean()), "Jaccard": float(scores.mean()),
            "seg img/s": len(images) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="'default' or a bundle folder")
    parser.add_argument("--fold", type=int, default=0, help="the fold whose held-out images are scored")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--sizes", default="128,192,256")
    parser.add_argument("--tta", default="none,flip")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.bundle:
        bundle = load_bundle(None if name == "default" else name)
        ids = held_out(bundle, args.fold, args.images)
        folder = DATA / "isic2018_task1"
        images = [correct_colors(decode_image(folder / "images" / f"{i}.jpg").rgb, bundle.preprocessing)
                  for i in ids]
        truths = [read_mask(folder / "masks" / f"{i}_segmentation.png", rgb.shape[:2]) for rgb, i in
                  zip(images, ids, strict=True)]
        fold_mb = (bundle.path / bundle.spec("segmentation").weight_file(args.fold)).stat().st_size / 2**20
        for size in map(int, args.sizes.split(",")):
            for tta in args.tta.split(","):
                rows.append({"bundle": Path(name).name, "trained": bundle.spec("segmentation").input_size[0],
                             "input": size, "tta": tta, **score(bundle, args.fold, size, tta, images, truths),
                             "fold MB": fold_mb, "folds": len(bundle.spec("segmentation").folds)})
    report(f"segmenters on {len(ids)} held-out ISIC 2018 Task 1 images (fold {args.fold})", rows,
           {"note": "speed: torch on this CPU, model passes only; end-to-end `dermbatch run` speed depends on "
                    "the engine and folds (benchmarks/bench_pipeline.py)"}, args.json)


if __name__ == "__main__":
    main()
