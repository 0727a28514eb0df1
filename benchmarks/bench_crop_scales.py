"""``dermbatch run`` with one crop per image vs ``--crop-scales`` (several crop sizes, logits averaged).

    python -m benchmarks.bench_crop_scales --images 96 --scales 0.85,1,1.2 --repeats 2

The installed default bundle (or ``--model``) on real HAM10000 images, the torch backend, CSV output only; the
two settings alternate (one, several, one, several, ...) so that a drift of the machine's speed hits both, and
every figure is the median over the repeats. The classify stage is the predictor's own timer (its share of the
run); the end-to-end rate excludes start-up (loading the bundle).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import add_model_option, bench_bundle, real_images, report
from dermbatch.pipeline import RunOptions, run


def timed_run(bundle: Path, images: list[Path], scales: str, out: Path) -> tuple[dict[str, float], np.ndarray]:
    summary = run(RunOptions(inputs=[str(p) for p in images], out=out, model=str(bundle), backend="torch",
                             device="cpu", crop_scales=scales, overwrite=True))
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    probs = np.array([[float(v) for v in r[1:]] for r in sorted(rows)])
    return {"classify s": summary.seconds["classify"], "images/s": summary.rates()["after_startup"]}, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--scales", default="0.85,1,1.2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    images = real_images(args.images)
    settings = ("1", args.scales)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bench_bundle(args.model or "default", Path(tmp) / "bundle", 5, "flip")
        figures: dict[str, list[dict]] = {s: [] for s in settings}
        probs = {}
        for repeat in range(args.repeats):
            for scales in settings:
                measured, probs[scales] = timed_run(bundle, images, scales, Path(tmp) / f"r{repeat}.csv")
                figures[scales].append(measured)
    median = {s: {k: statistics.median(f[k] for f in figures[s]) for k in figures[s][0]} for s in settings}
    base = median["1"]
    rows = [{"--crop-scales": s, "classify s": m["classify s"], "images/s (after start-up)": m["images/s"],
             "classify time vs one crop": m["classify s"] / base["classify s"],
             "run speed vs one crop": m["images/s"] / base["images/s"]} for s, m in median.items()]
    changed = float(np.abs(probs[args.scales] - probs["1"]).max())
    report(f"--crop-scales: {len(images)} HAM10000 images, torch backend, median of {args.repeats} alternating runs",
           rows, {"max |dp| between the two settings": changed,
                  "command": f"python -m benchmarks.bench_crop_scales --images {args.images} --scales {args.scales} "
                             f"--repeats {args.repeats}"}, args.json)


if __name__ == "__main__":
    main()
