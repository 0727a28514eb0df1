"""Cost of TTA views and folds: model-only time per image against folds x views (batched together, not looped).

    python -m benchmarks.bench_scaling --images 16

For each backend, time per image with 1 or 5 folds and TTA none (1 view), flip (4) or d4 (8), relative
to 1 fold without TTA. Linear scaling would multiply the time by folds x views; "efficiency" is that
product divided by the measured factor, so >= 1 means linear or better (one call carries every fold and
view: the ONNX graph stacks the folds, the pipeline stacks the views into the batch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.bench_pipeline import model_only_rate
from benchmarks.common import make_bundle, real_images, report
from dermbatch.backends import create_backend
from dermbatch.bundle import load_bundle
from dermbatch.tta import views

SETTINGS = [(1, "none"), (1, "flip"), (1, "d4"), (5, "none"), (5, "flip"), (5, "d4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from engines.build import build_onnxruntime_fp32
    from engines.calibration import calibration_inputs

    images = real_images(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles, data = {}, None
        for folds in sorted({f for f, _ in SETTINGS}):  # one bundle (and stacked engine) per fold count
            bundle_path = make_bundle(Path(tmp) / f"bundle{folds}", folds, "none")
            bundles[folds] = load_bundle(bundle_path)
            data = data or calibration_inputs(bundle_path, images, limit=args.images)
            build_onnxruntime_fp32(bundles[folds], data)
        for name in ("torch", "onnxruntime"):
            base = None
            for folds, tta in SETTINGS:
                bundle = bundles[folds]
                all_folds = {t: bundle.spec(t).folds for t in ("segmentation", "classification")}
                backend = create_backend(name, bundle, "cpu", all_folds)
                seconds = 1 / model_only_rate(backend, data, args.batch, tta)
                backend.close()
                base = base or seconds
                units = folds * len(views(tta))
                rows.append({"backend": name, "folds": folds, "TTA": tta, "folds x views": units,
                             "s/image": seconds, "time factor": seconds / base,
                             "efficiency": units / (seconds / base)})
    report(f"TTA and fold scaling, model only: {len(images)} HAM10000 images, batch {args.batch}", rows,
           {"command": f"python -m benchmarks.bench_scaling --images {args.images} --batch {args.batch}"}, args.json)


if __name__ == "__main__":
    main()
