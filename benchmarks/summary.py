"""One table of issue #6's targets from the JSON files the benchmark scripts wrote (each ratio measured side by side
within one script run).

    python -m benchmarks.bench_run --images 96 --model default --json out/bench_run.json
    python -m benchmarks.bench_engines --images 64 --model default --int8 --openvino --json out/bench_engines.json
    python -m benchmarks.bench_quality --model default --json out/bench_quality.json
    python -m benchmarks.bench_pipeline --images 64 --model default --backends torch,onnxruntime,openvino:bf16 \
        --json out/bench_pipeline.json
    python -m benchmarks.bench_memory --json out/bench_memory.json
    python -m benchmarks.bench_scaling --json out/bench_scaling.json
    python -m benchmarks.bench_large --model default --json out/bench_large.json   (no target; not in the table)
    python -m benchmarks.summary out            # prints the table, writes out/summary.json

A missing file leaves its rows out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import report


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def targets(folder: Path) -> list[dict]:
    rows = []

    def add(target: str, goal: str, value: float, met: bool, source: dict):
        rows.append({"target": target, "goal": goal, "measured": value, "met": "yes" if met else "no",
                     "command": source.get("command", "")})

    if run := _load(folder, "bench_run"):
        by = {r["method"]: r for r in run["rows"]}
        add("default run vs per-image loop", ">= 4x", by["dermbatch run (defaults)"]["speed-up vs naive"],
            by["dermbatch run (defaults)"]["speed-up vs naive"] >= 4, run)
    if engines := _load(folder, "bench_engines"):
        e2e = {r["method"]: r["images/s"] for r in engines["rows"] if r["stage"].endswith("after start-up)")}
        for fp32 in ("onnxruntime fp32", "openvino fp32"):
            if fp32 in e2e:
                add(f"{fp32} vs torch eager (end to end, after start-up)", ">= 2x", e2e[fp32] / e2e["torch"],
                    e2e[fp32] / e2e["torch"] >= 2, engines)
        for reduced in ("onnxruntime int8", "openvino bf16"):
            if reduced in e2e:
                ratio = e2e[reduced] / e2e["onnxruntime fp32"]
                add(f"{reduced} vs onnxruntime fp32 (end to end, after start-up)", ">= 1.5x", ratio, ratio >= 1.5,
                    engines)
    if quality := _load(folder, "bench_quality"):
        for r in quality["rows"][1:]:
            for metric in ("BA", "TJ"):
                loss = r[f"{metric} loss (points)"]
                add(f"{r['engine']} {metric} loss vs {quality['rows'][0]['engine']} (points)", "<= 0.5", loss,
                    loss <= 0.5, quality)
    if pipeline := _load(folder, "bench_pipeline"):
        for r in pipeline["rows"]:
            add(f"pipeline efficiency, {r['backend']}", ">= 0.90", r["efficiency"], r["efficiency"] >= 0.9, pipeline)
    if memory := _load(folder, "bench_memory"):
        ratio = memory["rows"][1]["peak RSS (MB)"] / memory["rows"][0]["peak RSS (MB)"]
        add(f"peak RSS, {memory['rows'][1]['images']} vs {memory['rows'][0]['images']} images", "<= 1.2", ratio,
            ratio <= 1.2, memory)
    if scaling := _load(folder, "bench_scaling"):
        for backend in sorted({r["backend"] for r in scaling["rows"]}):
            worst = min(r["efficiency"] for r in scaling["rows"] if r["backend"] == backend)
            add(f"folds x TTA views scaling, {backend} (worst setting)", ">= 1 (linear)", worst, worst >= 0.95,
                scaling)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    rows = targets(args.folder)
    if not rows:
        raise SystemExit(f"no benchmark JSON in {args.folder}")
    table = [{k: v for k, v in r.items() if k != "command"} for r in rows]
    report("dermbatch performance targets (issue #6)", table,
           {"commands": sorted({r["command"] for r in rows})}, args.folder / "summary.json")


if __name__ == "__main__":
    main()
