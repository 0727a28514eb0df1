"""Helpers shared by the benchmark scripts: real images, a default-architecture bundle, a results table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from dermbatch.bundle import CropSpec

DATA = Path(os.environ.get("DERMBATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_images(count: int, dataset: str = "ham10000") -> list[Path]:
    folder = DATA / dataset / "images"
    if not folder.is_dir():
        sys.exit(f"benchmark needs real images at {folder} (set DERMBATCH_DATA)")
    images = sorted(folder.glob("*.jpg"))
    return [images[i * len(images) // count] for i in range(count)]  # spread over the data set


def make_bundle(root: Path, folds: int, tta: str) -> Path:
    from dermbatch.models import create_random_bundle, default_specs

    if not (root / "bundle.json").exists():
        create_random_bundle(root, *default_specs(folds, tta), CropSpec(), name=f"bench-{folds}fold")
    return root


def add_model_option(parser) -> None:
    parser.add_argument("--model", help="a trained bundle ('default': the installed one) instead of a randomly "
                                        "initialised bundle of the default architecture (then --folds applies)")


def bench_bundle(model: str | None, root: Path, folds: int, tta: str) -> Path:
    """The bundle to measure: ``--model`` (its own folds), else a random one with ``folds`` folds."""
    if model:
        from dermbatch.bundle import load_bundle

        return load_bundle(None if model == "default" else model).path
    return make_bundle(root, folds, tta)


def ensure_engine(bundle, engine: str, calibration: dict) -> tuple[str, str | None]:
    """Build ``engine`` ("torch", "onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:bf16") unless
    it is there; return (backend, precision). Reduced-precision engines are kept whatever their agreement: the
    benchmarks measure it."""
    from dermbatch.backends.store import find_engine
    from engines.build import build_onnxruntime_fp32, build_onnxruntime_int8, build_openvino

    backend, _, precision = engine.partition(":")
    if backend == "torch":
        return backend, None
    precision = precision or "fp32"
    if find_engine(bundle, backend, precision) is None:
        if backend == "openvino":
            build_openvino(bundle, precision, calibration, min_agreement=0.0)
        elif precision == "int8":
            build_onnxruntime_int8(bundle, calibration, min_agreement=0.0)
        else:
            build_onnxruntime_fp32(bundle, calibration)
    return backend, precision


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def report(title: str, rows: list[dict], extra: dict, json_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console()
    console.print(table)
    for key, value in extra.items():
        console.print(f"{key}: {value}")
    if json_path:
        json_path.write_text(json.dumps({"title": title, "rows": rows, **extra, "machine": machine()}, indent=2))
        console.print(f"wrote {json_path}")
