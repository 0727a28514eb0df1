"""Large photos (ISIC 2019/2020 go up to 6000x4000): reduced-size JPEG decoding against a full decode.

    python -m benchmarks.bench_large --images 12 --size 6000x4000 --model default --json bench_large.json

Real HAM10000 images are enlarged to ``--size`` and written as JPEG (quality 95) into a temporary folder
(never into the repository). Timed side by side on those files:
* decode only: a full decode then a resize to the working size, against dermbatch's decode (libjpeg's DCT
  scaling at 1/2, 1/4 or 1/8, keeping at least 4x the classifier input on the shorter side);
* the Predictor end to end (segment, crop, classify; no files written) with reduced decoding on and off,
  the same images at their original HAM10000 size for reference, and the probabilities' largest difference
  between reduced and full decoding.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import add_model_option, bench_bundle, real_images, report
from dermbatch.bundle import load_bundle
from dermbatch.imageio import decode_image
from dermbatch.predictor import Predictor


def enlarge(images: list[Path], folder: Path, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in images:
        big = cv2.resize(cv2.imread(str(path)), (width, height), interpolation=cv2.INTER_CUBIC)
        target = folder / f"{path.stem}.jpg"
        cv2.imwrite(str(target), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        out.append(target)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def predict_all(bundle: Path, images: list[Path], reduced: bool) -> dict[str, np.ndarray]:
    with Predictor(bundle, reduced_decode=reduced) as predictor:
        return {r.image_id: r.probabilities for r in predictor.predict(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT of the enlarged photos")
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    originals = real_images(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DERMBATCH_CACHE", str(Path(tmp) / "cache"))
        bundle = bench_bundle(args.model, Path(tmp) / "bundle", 5, "flip")
        large = enlarge(originals, Path(tmp) / "large", width, height)
        megabytes = sum(p.stat().st_size for p in large) / len(large) / 1e6
        min_side = 4 * max(load_bundle(bundle).classification.input_size)

        def full_then_resize():
            for path in large:
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                scale = min_side / min(bgr.shape[:2])
                cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)

        def reduced_decode():
            for path in large:
                decode_image(path, min_side=min_side)

        full_s, _ = timed(full_then_resize)
        reduced_s, _ = timed(reduced_decode)
        for name, seconds in (("decode: full, then resize", full_s), ("decode: dermbatch (reduced JPEG decode)",
                                                                      reduced_s)):
            rows.append({"case": name, "images/s": len(large) / seconds, "vs full decode": full_s / seconds})
        predict_all(bundle, originals[:2], True)  # warm-up: first-use engine, kernels
        small_s, _ = timed(lambda: predict_all(bundle, originals, True))
        full_e2e, full_probs = timed(lambda: predict_all(bundle, large, False))
        reduced_e2e, reduced_probs = timed(lambda: predict_all(bundle, large, True))
        diff = max(float(np.abs(full_probs[k] - reduced_probs[k]).max()) for k in full_probs)
        for name, seconds in ((f"predictor, {width}x{height}, full decode", full_e2e),
                              (f"predictor, {width}x{height}, reduced decode", reduced_e2e),
                              ("predictor, original HAM10000 size (reference)", small_s)):
            rows.append({"case": name, "images/s": len(large) / seconds, "vs full decode": full_e2e / seconds})
    model = f" --model {args.model}" if args.model else ""
    report(f"Large photos: {len(large)} HAM10000 images enlarged to {width}x{height} ({megabytes:.1f} MB JPEG each)",
           rows, {"max |dp| reduced vs full decode": diff,
                  "command": f"python -m benchmarks.bench_large --images {args.images} --size {args.size}{model}"},
           args.json)


if __name__ == "__main__":
    main()
