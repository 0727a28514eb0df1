"""``dermbatch run`` locally vs ``--ray`` (1 and 2 actors), and the Ray driver's own ceiling, side by side.

    python -m benchmarks.bench_ray --images 64 --json bench_ray.json
    python -m benchmarks.bench_ray --images 64 --ceiling-images 2048 --backend torch

One process starts a local Ray cluster (``ray.init``, every core of this machine; its start-up is timed and
printed apart) and times, on the same real HAM10000 images and the same bundle and backend:
* local: ``dermbatch run`` as a user types it (batch 8, 2 decode workers, background writer);
* --ray, 1 actor / 2 actors: the same run with prediction on Ray Data actors (1 CPU each);
* driver ceiling: ``--ray`` with 2 stub actors that return pre-computed results (the real results of these
  images, replicated under new names to ``--ceiling-images``) instead of predicting: what the driver alone
  can stream back, unpickle and write (CSV, details, masks) per second. Past that rate, more GPUs stop helping.
Each ``--ray`` row includes the actors' start-up (loading the models), as a user's run does; every row writes
the CSV, details and masks. The ``--ray`` results are checked against the local run's (max |dp| printed).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_model_option, bench_bundle, real_images, report
from dermbatch.backends import resolve_backend_name
from dermbatch.bundle import load_bundle
from dermbatch.cluster import strip_arrays
from dermbatch.pipeline import RunOptions, run
from dermbatch.predictor import Predictor


def timed_run(images: Path, workdir: Path, bundle: Path, backend: str, **ray) -> tuple[float, dict]:
    out = workdir / "results.csv"
    start = time.perf_counter()
    run(RunOptions(inputs=[str(images)], out=out, model=str(bundle), backend=backend, masks=workdir / "masks",
                   overwrite=True, **ray))
    seconds = time.perf_counter() - start
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    return seconds, {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}


def stub_actor(payloads: dict[str, bytes]):
    """A Ray Data actor class that answers each path with its pre-computed result, renamed: no model, no decode."""

    class StubActor:
        def __init__(self, *_):
            pass

        def __call__(self, batch):
            out = []
            for image_id, path in zip(batch["image_id"], batch["path"], strict=True):
                row = pickle.loads(payloads[Path(path).stem.split("~")[0]])
                row["result"].image_id, row["result"].path = str(image_id), Path(path)
                out.append(pickle.dumps(row, protocol=5))
            return {"image_id": np.asarray(batch["image_id"]), "payload": np.array(out, dtype=object)}

    return StubActor


def precomputed(bundle: Path, backend: str, images: list[Path]) -> dict[str, bytes]:
    """Each image's real result, with only the mask the outputs need, pickled as a PredictActor returns it."""
    with Predictor(bundle, backend=backend) as predictor:
        runtime = predictor.describe()
        return {r.image_id: pickle.dumps({"result": strip_arrays(r, frozenset({"mask"})), "actor": "stub",
                                          "runtime": runtime, "seconds": {}}, protocol=5)
                for r in predictor.predict(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--ceiling-images", type=int, default=2048, help="images the driver-ceiling row writes")
    parser.add_argument("--backend", default="auto", help="the backend every row uses (resolved once, here)")
    parser.add_argument("--json", type=Path)
    add_model_option(parser)
    args = parser.parse_args()
    import ray

    from dermbatch.cluster import RayPredictor

    images = real_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = bench_bundle(args.model or "default", tmp / "bundle", 5, "flip")
        backend = resolve_backend_name(args.backend, load_bundle(bundle), "auto")  # first-use engine, untimed
        folder, ceiling = tmp / "images", tmp / "ceiling"
        folder.mkdir(), ceiling.mkdir()
        for path in images:
            (folder / path.name).symlink_to(path)
        for i in range(args.ceiling_images):
            path = images[i % len(images)]
            (ceiling / f"{path.stem}~{i:06d}{path.suffix}").symlink_to(path)
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
        cluster_start = time.perf_counter() - start
        try:
            rows, outputs = [], {}
            for name, count, kwargs in [("local run", len(images), {}),
                                        ("--ray, 1 actor", len(images), {"ray": "auto", "ray_actors": 1}),
                                        ("--ray, 2 actors", len(images), {"ray": "auto", "ray_actors": 2})]:
                work = tmp / name.replace(" ", "").replace(",", "_")
                work.mkdir()
                seconds, outputs[name] = timed_run(folder, work, bundle, backend, **kwargs)
                rows.append({"method": name, "images": count, "seconds": seconds, "images/s": count / seconds})
            payloads = precomputed(bundle, backend, images)
            RayPredictor.actor_class = stub_actor(payloads)
            work = tmp / "ceiling_out"
            work.mkdir()
            seconds, _ = timed_run(ceiling, work, bundle, backend, ray="auto", ray_actors=2)
            rows.append({"method": "driver ceiling (stub actors)", "images": args.ceiling_images,
                         "seconds": seconds, "images/s": args.ceiling_images / seconds})
        finally:
            ray.shutdown()
    local = rows[0]["images/s"]
    for row in rows:
        row["vs local"] = row["images/s"] / local
    for row, name in zip(rows, outputs, strict=False):
        row["max |dp| vs local"] = float(max(np.abs(outputs[name][k] - outputs["local run"][k]).max()
                                             for k in outputs["local run"]))
    rows[-1]["max |dp| vs local"] = "-"
    model = f" --model {args.model}" if args.model else ""
    report(f"dermbatch run vs --ray on this machine ({os.cpu_count()} cores), backend {backend}", rows,
           {"ray cluster start-up (untimed above), s": round(cluster_start, 1),
            "command": f"python -m benchmarks.bench_ray --images {args.images} --ceiling-images "
                       f"{args.ceiling_images} --backend {args.backend}{model}"}, args.json)


if __name__ == "__main__":
    main()
