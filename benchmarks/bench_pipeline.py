"""Pipeline efficiency: end-to-end images/s divided by model-only images/s (same backend, batch, folds, TTA).

    python -m benchmarks.bench_pipeline --images 32 --folds 5 --tta flip
    python -m benchmarks.bench_pipeline --images 64 --model default --backends torch,onnxruntime,openvino:bf16

Model-only: the backend's forward calls on inputs prepared beforehand (all TTA views stacked, as the
pipeline stacks them). End to end: ``dermbatch run`` (decode, segment, post-process, crop, classify, write
CSVs and masks) from the first image to the last, after the models are loaded. A ratio near 1 means
decoding, pre/post-processing and writing hide behind inference. The two are measured alternately
``--repeats`` times and the best rate of each is kept (single runs vary by about 15 % on a shared 2-core VM).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_model_option, bench_bundle, ensure_engine, real_images, report
from dermbatch.backends import create_backend
from dermbatch.bundle import load_bundle
from dermbatch.pipeline import RunOptions, run
from dermbatch.tta import stack_views


def model_only_rate(backend, data: dict, batch: int, tta: str) -> float:
    stacked = []
    for start in range(0, len(data["segmentation"]), batch):
        stacked.append({task: stack_views(data[task][start:start + batch], tta)[1] for task in data})
    backend.segment(stacked[0]["segmentation"])  # warm-up
    backend.classify(stacked[0]["classification"])
    begin = time.perf_counter()
    for views in stacked:
        backend.segment(views["segmentation"])
        backend.classify(views["classification"])
    return len(data["segmentation"]) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tta", default="flip", choices=["none", "flip", "d4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best rate of each is kept")
    parser.add_argument("--backends", default="torch,onnxruntime", help="backend[:precision] list, e.g. "
                                                                      "torch,onnxruntime,openvino:bf16")
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    from engines.calibration import calibration_inputs

    images = real_images(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DERMBATCH_CACHE"] = str(Path(tmp) / "cache")  # engines of an installed bundle stay here
        bundle_path = bench_bundle(args.model, Path(tmp) / "bundle", args.folds, args.tta)
        bundle = load_bundle(bundle_path)
        data = calibration_inputs(bundle_path, images, limit=args.images)
        folds = {t: bundle.spec(t).folds for t in ("segmentation", "classification")}
        for engine in args.backends.split(","):
            name, precision = ensure_engine(bundle, engine, data)
            model_rate, e2e = 0.0, 0.0
            for repeat in range(args.repeats):  # alternate the two, keep the best of each: this machine is noisy
                backend = create_backend(name, bundle, "cpu", folds, precision=precision)
                model_rate = max(model_rate, model_only_rate(backend, data, args.batch, args.tta))
                backend.close()
                summary = run(RunOptions(inputs=[str(p) for p in images], out=Path(tmp) / engine / f"r{repeat}.csv",
                                         model=str(bundle_path), backend=name, precision=precision, tta=args.tta,
                                         batch_size=args.batch, masks=Path(tmp) / engine / "masks", overwrite=True))
                e2e = max(e2e, summary.rates()["after_startup"])
            rows.append({"backend": engine, "model-only images/s": model_rate, "end-to-end images/s": e2e,
                         "efficiency": e2e / model_rate})
    model = f" --model {args.model}" if args.model else f" --folds {args.folds}"
    report(f"Pipeline efficiency: {len(images)} HAM10000 images, {model.strip()}, TTA {args.tta}, batch {args.batch}",
           rows, {"command": f"python -m benchmarks.bench_pipeline --images {args.images}{model} --tta {args.tta} "
                             f"--batch {args.batch} --backends {args.backends} --repeats {args.repeats}"}, args.json)


if __name__ == "__main__":
    main()
