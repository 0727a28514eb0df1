"""``dermbatch build-engine``: export, compile and check engines for a bundle, stored beside it.

One linear function per target: ONNX Runtime (fp32 graph; int8 quantised from it), OpenVINO (its IR converted
from that graph, run in fp32 or bf16) and TensorRT (FP16 plan).
Each engine is checked against its reference on real images at build time and the agreement is recorded.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from dermbatch.backends.store import INPUT, engine_key, find_engine, writable_root, write_info
from dermbatch.bundle import Bundle, load_bundle
from dermbatch.errors import UsageError
from engines.calibration import calibration_inputs
from engines.checks import TASKS, agreement, engine_info, refuse_below
from engines.export import compare, export_module, load_stacked

log = logging.getLogger(__name__)
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "sample_images"  # present in a source checkout


def resolve_target(target: str, precision: str | None) -> tuple[str, str]:
    """``auto``: the engine ``run --backend auto`` would use here: TensorRT FP16 when TensorRT and a CUDA GPU are
    here, else OpenVINO fp32 when installed, else ONNX Runtime fp32 (logged)."""
    if target == "auto":
        from dermbatch.backends.tensorrt import cpu_engine_target, tensorrt_available

        available, reason = tensorrt_available()
        target = "tensorrt" if available else cpu_engine_target()
        log.info("build-engine: target %s (%s)", target, "TensorRT and a CUDA GPU found" if available else reason)
    if target not in ("onnxruntime", "openvino", "tensorrt"):
        raise UsageError(f"--target {target!r}: choose auto, onnxruntime, openvino or tensorrt")
    precision = precision or ("fp16" if target == "tensorrt" else "fp32")
    allowed = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16"), "tensorrt": ("fp16", "fp32")}[target]
    if precision not in allowed:
        raise UsageError(f"--precision {precision} is not built for {target}; choose {', '.join(allowed)}")
    return target, precision


def build_onnxruntime_fp32(bundle: Bundle, calibration: dict[str, np.ndarray]) -> Path:
    folder = writable_root(bundle) / engine_key("onnxruntime", "fp32")
    agreements = {}
    for task in TASKS:
        spec = bundle.spec(task)
        module = load_stacked(bundle, task, spec.folds)
        path = export_module(module, spec.input_size, folder / f"{task}.onnx")
        agreements[task] = compare(path, module, calibration[task][:16], task)
        log.info("onnxruntime fp32 %s: %d folds, max |logit diff| vs torch %.2e", task, len(spec.folds),
                 agreements[task]["max_abs_diff"])
    write_info(folder, engine_info(bundle, "onnxruntime", "fp32", folder, agreements))
    return folder


def build_onnxruntime_int8(bundle: Bundle, calibration: dict[str, np.ndarray], min_agreement: float) -> Path:
    import onnxruntime as ort

    from engines.quantize import quantize_int8

    fp32_folder = _onnx_fp32_folder(bundle, calibration)
    folder = writable_root(bundle) / engine_key("onnxruntime", "int8")
    folder.mkdir(parents=True, exist_ok=True)
    agreements = {}
    for task in TASKS:
        path = quantize_int8(fp32_folder / f"{task}.onnx", folder / f"{task}.onnx", calibration[task])
        sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                    for p in (fp32_folder / f"{task}.onnx", path)]
        outputs = [s.run(None, {INPUT: calibration[task]})[0] for s in sessions]
        agreements[task] = agreement(task, *outputs)
        log.info("onnxruntime int8 %s vs fp32: %s", task, agreements[task])
    refuse_below(folder, agreements, min_agreement, "int8", "Use the fp32 engine, or more/other --calibration images")
    write_info(folder, engine_info(bundle, "onnxruntime", "int8", folder, agreements,
                             {"calibration_images": int(len(calibration["segmentation"]))}))
    return folder


def build_openvino(bundle: Bundle, precision: str, calibration: dict[str, np.ndarray], min_agreement: float) -> Path:
    """OpenVINO IR converted from the ONNX Runtime fp32 graph (fp32 weights kept), checked against that graph's
    outputs on real images and refused below ``min_agreement`` (top-1 agreement / mean mask IoU)."""
    import onnxruntime as ort

    from dermbatch.backends.openvino import compile_model, require_openvino

    ov = require_openvino()
    core = ov.Core()
    onnx_folder = _onnx_fp32_folder(bundle, calibration)
    folder = writable_root(bundle) / engine_key("openvino", precision)
    folder.mkdir(parents=True, exist_ok=True)
    agreements = {}
    for task in TASKS:
        source = onnx_folder / f"{task}.onnx"
        path = folder / f"{task}.xml"
        ov.save_model(ov.convert_model(str(source)), str(path), compress_to_fp16=False)
        request = compile_model(core, path, precision).create_infer_request()
        reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
            None, {INPUT: calibration[task]})[0]
        agreements[task] = agreement(task, reference, request.infer({0: calibration[task]})[0])
        log.info("openvino %s %s vs onnxruntime fp32: %s", precision, task, agreements[task])
    refuse_below(folder, agreements, min_agreement, f"OpenVINO {precision}", "Use --precision fp32")
    write_info(folder, engine_info(bundle, "openvino", precision, folder, agreements))
    return folder


def _onnx_fp32_folder(bundle: Bundle, calibration: dict[str, np.ndarray]) -> Path:
    """The ONNX Runtime fp32 engine's folder (built if missing): the graph int8 and OpenVINO start from."""
    found = find_engine(bundle, "onnxruntime", "fp32")
    return found[0] if found else build_onnxruntime_fp32(bundle, calibration)


def build_engine(model: str | None, target: str = "auto", precision: str | None = None,
                 batch: tuple[int, int, int] = (1, 8, 32), calibration: Path | None = None,
                 min_agreement: float = 0.95, device: str = "auto") -> Path:
    bundle = load_bundle(model)
    target, precision = resolve_target(target, precision)
    if precision == "int8" and calibration is None:
        raise UsageError("--precision int8 needs --calibration DIR: real images representative of your data")
    images = calibration or _sample_images()
    data = calibration_inputs(bundle.path, images, limit=64 if precision == "int8" else 16)
    if target == "onnxruntime":
        if precision == "int8":
            return build_onnxruntime_int8(bundle, data, min_agreement)
        return build_onnxruntime_fp32(bundle, data)
    if target == "openvino":
        return build_openvino(bundle, precision, data, min_agreement)
    from engines.tensorrt_build import build_tensorrt

    return build_tensorrt(bundle, precision, batch, data, device, min_agreement)


def build_first_use_engine(bundle: Bundle) -> Path:
    """The fastest exact (fp32) CPU engine of the installed default bundle: OpenVINO fp32 when OpenVINO is
    installed (1.2x ONNX Runtime end to end here, same outputs within 1e-4), else ONNX Runtime fp32. Checked on
    the sample images when they are at hand (a source checkout), else on seeded noise (numeric either way)."""
    folder = SAMPLE_IMAGES
    if folder.is_dir():
        data = calibration_inputs(bundle.path, folder, limit=16)
    else:
        rng = np.random.default_rng(0)
        data = {task: rng.normal(size=(4, 3, *bundle.spec(task).input_size)).astype(np.float32) for task in TASKS}
    if importlib.util.find_spec("openvino") is not None:
        return build_openvino(bundle, "fp32", data, min_agreement=0.99)
    return build_onnxruntime_fp32(bundle, data)


def _sample_images() -> Path:
    folder = SAMPLE_IMAGES
    if not folder.is_dir():
        raise UsageError("pass --calibration DIR with a few real images to check the engine against")
    return folder
