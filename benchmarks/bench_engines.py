"""torch eager vs ONNX Runtime fp32 (vs int8, vs OpenVINO fp32/bf16), per model and end to end, side by side on
real images.

    python -m benchmarks.bench_engines --images 32 --folds 5 --json bench_engines.json
    python -m benchmarks.bench_engines --images 64 --model default --int8 --openvino --json bench_engines.json

Also measures one ONNX graph holding all folds (outputs stacked) against one session per fold.
Randomly initialised default-architecture models: speed does not depend on the weight values, but the int8
agreement printed here does, so int8 and bf16 accuracy must be judged on a trained bundle
(``benchmarks.bench_quality``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_model_option, bench_bundle, ensure_engine, real_images, report
from dermbatch.backends import create_backend
from dermbatch.bundle import load_bundle
from dermbatch.pipeline import RunOptions, run


def throughput(fn, x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm-up: oneDNN and ONNX Runtime prepare kernels per input shape on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - start)


def per_fold_sessions(bundle, task: str, folder: Path):
    import onnxruntime as ort

    from dermbatch.backends.onnxruntime import session_options
    from dermbatch.backends.store import INPUT
    from dermbatch.models import load_fold_model
    from engines.export import export_module

    spec = bundle.spec(task)
    sessions = [ort.InferenceSession(str(export_module(load_fold_model(bundle, task, f), spec.input_size,
                                                       folder / f"{task}_fold{f}.onnx")),
                                     sess_options=session_options(), providers=["CPUExecutionProvider"])
                for f in spec.folds]
    return lambda x: np.stack([s.run(None, {INPUT: x})[0] for s in sessions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="images per model call")
    parser.add_argument("--int8", action="store_true", help="also build and time the int8 engine")
    parser.add_argument("--openvino", action="store_true", help="also build and time OpenVINO fp32 and (on CPUs "
                                                                "with bf16) bf16 engines")
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    from engines.calibration import calibration_inputs

    images = real_images(args.images)
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DERMBATCH_CACHE"] = str(Path(tmp) / "cache")  # engines of an installed bundle stay here
        bundle_path = bench_bundle(args.model, Path(tmp) / "bundle", args.folds, "none")
        bundle = load_bundle(bundle_path)
        data = calibration_inputs(bundle_path, images, limit=args.images)
        wanted = ["onnxruntime:fp32"] + ["onnxruntime:int8"] * args.int8
        if args.openvino:
            from dermbatch.backends.openvino import cpu_has_bf16

            wanted += ["openvino:fp32"] + ["openvino:bf16"] * cpu_has_bf16()
        engines = [ensure_engine(bundle, engine, data) for engine in wanted]
        folds = {t: bundle.spec(t).folds for t in ("segmentation", "classification")}
        backends = {"torch": create_backend("torch", bundle, "cpu", folds)}
        for target, precision in engines:
            backends[f"{target} {precision}"] = create_backend(target, bundle, "cpu", folds, precision=precision)
        for task, method in (("segmentation", "segment"), ("classification", "classify")):
            x = data[task][: args.batch]
            speeds = {name: throughput(getattr(b, method), x, 3) for name, b in backends.items()}
            speeds["onnxruntime fp32, one session per fold"] = throughput(
                per_fold_sessions(bundle, task, Path(tmp) / "perfold"), x, 3)
            for name, speed in speeds.items():
                rows.append({"stage": f"{task} model ({len(folds[task])} folds)", "method": name, "images/s": speed,
                             "vs torch": speed / speeds["torch"]})
        for name in backends:
            out = Path(tmp) / name.replace(" ", "_") / "r.csv"
            backend, precision = (name.split() + [None])[:2]
            summary = run(RunOptions(inputs=[str(p) for p in images], out=out, model=str(bundle_path),
                                     backend=backend, precision=precision, tta="none", overwrite=True))
            rates = summary.rates()
            rows.append({"stage": "end to end (dermbatch run, start-up included)", "method": name,
                         "images/s": rates["end_to_end"], "vs torch": 0.0})
            rows.append({"stage": "end to end (dermbatch run, after start-up)", "method": name,
                         "images/s": rates["after_startup"], "vs torch": 0.0})
        for stage in {r["stage"] for r in rows if r["stage"].startswith("end")}:
            same = [r for r in rows if r["stage"] == stage]
            for r in same:
                r["vs torch"] = r["images/s"] / same[0]["images/s"]
        info = load_bundle(bundle_path)
        from dermbatch.backends.store import find_engine

        for target, precision in engines:
            extra[f"agreement {target} {precision}"] = find_engine(info, target, precision)[1]["agreement"]
    model = f" --model {args.model}" if args.model else f" --folds {args.folds}"
    extra["command"] = (f"python -m benchmarks.bench_engines --images {args.images}{model} "
                        f"--batch {args.batch}" + (" --int8" if args.int8 else "")
                        + (" --openvino" if args.openvino else ""))
    report(f"Engines on CPU: {len(images)} HAM10000 images,{model}, batch {args.batch}, no TTA",
           rows, extra, args.json)


if __name__ == "__main__":
    main()
