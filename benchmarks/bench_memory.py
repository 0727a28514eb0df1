"""Peak memory of ``dermbatch run`` against the number of images (it must not grow with the batch).

    python -m benchmarks.bench_memory --small 1000 --large 10000

Each run is a separate process over real HAM10000 images repeated (symlinks) to the count, with a small
randomly initialised bundle so 10,000 images take minutes on a CPU; the models' own memory is the same
for any image count, so what grows, if anything, is the pipeline's. Prints peak RSS of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import real_images, report

CHILD = """
import json, resource, sys, time
from dermbatch.pipeline import RunOptions, run
start = time.perf_counter()
summary = run(RunOptions(inputs=[sys.argv[1]], out=sys.argv[2], model=sys.argv[3], tta="none", overwrite=True,
                         masks=sys.argv[4]))
print(json.dumps({"ok": summary.ok, "failed": summary.failed, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from dermbatch.bundle import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from dermbatch.models import create_random_bundle

    sources = real_images(500)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seg = ModelSpec("segmentation", "unet", "tu-mobilenetv3_small_050", (128, 128), IMAGENET_MEAN, IMAGENET_STD,
                        (0,), tta="none")
        cls = ModelSpec("classification", "timm", "mobilenetv3_small_050", (128, 128), IMAGENET_MEAN, IMAGENET_STD,
                        (0,), tta="none")
        create_random_bundle(tmp / "bundle", seg, cls)
        for count in (args.small, args.large):
            folder = tmp / f"images_{count}"
            folder.mkdir()
            for i in range(count):
                (folder / f"img_{i:06d}.jpg").symlink_to(sources[i % len(sources)])
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp / f"r{count}.csv"),
                                  str(tmp / "bundle"), str(tmp / f"masks{count}")],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"run over {count} images failed:\n{out.stderr[-2000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"images": count, "processed": result["ok"], "seconds": result["seconds"],
                         "images/s": result["ok"] / result["seconds"], "peak RSS (MB)": result["peak_rss_mb"]})
    ratio = rows[1]["peak RSS (MB)"] / rows[0]["peak RSS (MB)"]
    report("Peak memory of dermbatch run vs image count", rows,
           {f"peak RSS ratio {args.large} / {args.small} images": f"{ratio:.3f}",
            "command": f"python -m benchmarks.bench_memory --small {args.small} --large {args.large}"}, args.json)


if __name__ == "__main__":
    main()
