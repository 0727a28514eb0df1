"""TensorRT FP16 plans: one linear, loud build function per plan (TensorRT 10 and 11 Python API).

TensorRT 10: parse the fp32 ONNX and set ``BuilderFlag.FP16``. TensorRT 11 removed that flag: it builds a
strongly typed network from an ONNX exported in fp16. Both: every parser error logged, an optimisation
profile from ``--batch MIN,OPT,MAX``, a workspace limit, a timing cache reused across builds, and an error
when the build returns None. Untestable without an NVIDIA GPU; everything around it is tested on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dermbatch.backends.store import INPUT, engine_key, writable_root, write_info
from dermbatch.backends.tensorrt import (
    TrtRunner,
    current_device,
    device_tag,
    require_tensorrt,
    select_device,
    write_sidecar,
)
from dermbatch.bundle import Bundle, sha256_file
from dermbatch.errors import BackendError
from engines.checks import TASKS, agreement, engine_info, refuse_unfit
from engines.export import export_module, load_stacked

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 4 << 30


def tensorrt_major() -> int:
    import tensorrt as trt

    return int(trt.__version__.split(".")[0])


def build_plan(onnx_path: Path, plan_path: Path, precision: str, input_size: tuple[int, int],
               batch: tuple[int, int, int], timing_cache: Path) -> float:
    """Compile ``onnx_path`` into ``plan_path``; return the build time in seconds."""
    import tensorrt as trt

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = precision == "fp16" and tensorrt_major() >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            log.error("TensorRT ONNX parser: %s", error)
        raise BackendError(f"{onnx_path}: TensorRT could not parse the ONNX graph ({len(errors)} errors, "
                           f"first: {errors[0] if errors else 'unknown'})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default on Ampere and later: fp32 must mean fp32
    profile = builder.create_optimization_profile()
    low, opt, high = ((b, 3, *input_size) for b in batch)
    profile.set_shape(INPUT, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"invalid optimisation profile for batch {batch}")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("tensorrt: timing cache %s not usable; building without it", timing_cache)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BackendError("TensorRT could not create a timing cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT build failed (see the errors logged above)")
    plan_path.write_bytes(bytes(serialized))
    updated = config.get_timing_cache()
    if updated is not None:
        timing_cache.write_bytes(bytes(updated.serialize()))
    return time.perf_counter() - start


def build_tensorrt(bundle: Bundle, precision: str, batch: tuple[int, int, int], calibration: dict, device: str,
                   min_agreement: float = 0.95) -> Path:
    require_tensorrt("--target tensorrt")
    if not batch[0] <= batch[1] <= batch[2]:
        raise BackendError(f"--batch {batch}: need MIN <= OPT <= MAX")
    select_device(device)  # export, build and check all run on the chosen GPU
    dev = current_device()
    root = writable_root(bundle)
    folder = root / engine_key("tensorrt", precision, device_tag(dev))
    timing_cache = root / f"tensorrt-timing-{device_tag(dev)}.cache"  # one per GPU model and TensorRT version
    agreements = {}
    for task in TASKS:
        spec = bundle.spec(task)
        module = load_stacked(bundle, task, spec.folds)
        half_onnx = precision == "fp16" and tensorrt_major() >= 11
        onnx_path = export_module(module, spec.input_size, folder / f"{task}.onnx", half=half_onnx)
        plan = folder / f"{task}.plan"
        seconds = build_plan(onnx_path, plan, precision, spec.input_size, batch, timing_cache)
        agreements[task] = _check_plan(task, plan, module, calibration[task], TrtRunner, agreement)
        write_sidecar(plan, {**dev, "precision": precision, "profile": {"input": INPUT, "min": batch[0],
                      "opt": batch[1], "max": batch[2], "input_size": list(spec.input_size)},
                      "onnx_sha256": sha256_file(onnx_path), "build_seconds": round(seconds, 1),
                      "agreement_vs_fp32": agreements[task]})
        log.info("tensorrt %s %s: built in %.0f s; vs torch fp32 %s", precision, task, seconds, agreements[task])
    refuse_unfit(folder, agreements, min_agreement, f"TensorRT {precision}")
    write_info(folder, engine_info(bundle, "tensorrt", precision, folder, agreements, {"device": dev}))
    return folder


def _check_plan(task, plan, module, data, runner_cls, agreement_fn) -> dict:
    """The plan vs the fp32 torch models (the caller's module, never cast) on the same real images: max logit
    diff, top-1, mask IoU, and whether every output is finite. The runner pads a set smaller than MIN."""
    import numpy as np
    import torch

    with torch.no_grad():
        reference = module.float().cpu()(torch.from_numpy(data)).numpy()
    with runner_cls(plan) as runner:
        outputs = runner(torch.from_numpy(data).cuda()).float().cpu().numpy()
    return agreement_fn(task, reference, outputs) | {"finite": bool(np.isfinite(outputs).all())}
