"""The classifier folds of a bundle: every fold whole vs their shared part once, side by side in one run.

    python -m benchmarks.bench_folds --model default --images 128 --repeats 3

Folds that share their stem and first stages (``train --tune-stages K``: stages 0..K-1; ``--frozen-backbone``:
the whole backbone) are run by ``dermbatch run`` and the engines as ``SharedBackboneFolds``: that part once,
then each fold's own rest. This times both on the same real images (HAM10000 resized to the classifier's
input; batch 4 and channels-last, as the torch backend on a CPU), alternating the two ways ``--repeats``
times, with PyTorch and, with ``--onnx``, with ONNX Runtime sessions of both exported graphs. It prints
images/s (one image = all folds) and the largest difference from every fold whole's logits.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import real_images, report
from dermbatch.bundle import load_bundle
from dermbatch.models import SharedBackboneFolds, load_fold_model, shares_backbone
from dermbatch.preprocess import model_input


def inputs(count: int, spec) -> np.ndarray:
    return np.stack([model_input(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), spec)
                     for p in real_images(count)])


def timed(run, x: np.ndarray, batch: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)], axis=1)
    return out, len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="a bundle ('default': the installed one)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also ONNX Runtime sessions of both graphs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    bundle = load_bundle(None if args.model == "default" else args.model)
    spec = bundle.classification
    models = [load_fold_model(bundle, "classification", f).eval() for f in spec.folds]
    if not shares_backbone(models):
        raise SystemExit(f"{bundle.path}: its classifier folds share nothing; nothing to compare")
    shared = SharedBackboneFolds(models).eval().to(memory_format=torch.channels_last)
    x = inputs(args.images, spec)

    def tensor(b: np.ndarray) -> torch.Tensor:  # channels_last, as the torch backend runs
        return torch.from_numpy(b).contiguous(memory_format=torch.channels_last)

    ways = {"every fold whole": lambda b: torch.stack([m(tensor(b)) for m in models]).numpy(),
            f"shared part once ({shared.stages} stages)": lambda b: shared(tensor(b)).numpy()}
    if args.onnx:
        import onnxruntime as ort

        from dermbatch.backends.onnxruntime import session_options
        from engines.export import StackedFolds, export_module

        whole, once = StackedFolds(models), StackedFolds(models)
        whole.shared = None
        folder = Path(tempfile.mkdtemp(prefix="bench_folds_"))
        for name, module in (("onnxruntime, every fold whole", whole), ("onnxruntime, shared part once", once)):
            path = export_module(module.eval(), spec.input_size, folder / f"{len(ways)}.onnx")
            session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            ways[name] = lambda b, s=session: s.run(None, {"images": b})[0]
    speeds: dict[str, list[float]] = {name: [] for name in ways}
    outputs = {}
    with torch.inference_mode():
        for run in ways.values():  # warm-up
            run(x[:args.batch])
        for _ in range(args.repeats):
            for name, run in ways.items():
                outputs[name], speed = timed(run, x, args.batch)
                speeds[name].append(speed)
    reference = outputs["every fold whole"]
    base = float(np.median(speeds["every fold whole"]))
    rows = [{"way": name, "images/s (median)": f"{np.median(s):.1f}", "runs": " ".join(f"{v:.1f}" for v in s),
             "vs every fold whole": f"{np.median(s) / base:.2f}",
             "max |logit diff|": f"{np.abs(outputs[name] - reference).max():.1e}"} for name, s in speeds.items()]
    report(f"{bundle.path.name}: {len(models)} classifier folds, {args.images} images, batch {args.batch}", rows,
           {"shared_stages": shared.stages}, args.json)


if __name__ == "__main__":
    main()
