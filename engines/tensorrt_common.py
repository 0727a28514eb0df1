"""What TensorRT plans need around them, testable without TensorRT: availability, the sidecar JSON, and the
check that a plan matches this GPU and TensorRT before it is deserialised.

A plan is only valid for the TensorRT version and GPU model (compute capability) it was built with; the
sidecar ``<task>.plan.json`` records them, and a mismatch is refused with the exact rebuild command.
Plans themselves stay untouched (no header), so trtexec and Polygraphy can load them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dermbatch.errors import BackendError


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when TensorRT imports and torch sees a CUDA GPU, else (False, what is missing)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install 'dermbatch[tensorrt]' on an NVIDIA machine)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    return True, ""


def require_tensorrt(what: str) -> None:
    available, reason = tensorrt_available()
    if not available:
        raise BackendError(f"{what} needs TensorRT and an NVIDIA GPU: {reason}. "
                           "Use --backend onnxruntime (build it with: dermbatch build-engine --target onnxruntime) "
                           "or --backend torch")


def current_device() -> dict:
    """The GPU and TensorRT of this machine, in the sidecar's terms."""
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}"}


def device_tag(device: dict) -> str:
    """Part of the engine folder name: GPU model, compute capability and TensorRT major.minor."""
    trt_version = ".".join(device["tensorrt"].split(".")[:2])
    gpu = re.sub(r"[^A-Za-z0-9]+", "", device["gpu"].replace("NVIDIA", ""))
    return f"{gpu}-sm{device['compute_capability'].replace('.', '')}-trt{trt_version}"


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def write_sidecar(plan: Path, info: dict) -> Path:
    path = sidecar_path(plan)
    path.write_text(json.dumps(info, indent=2))
    return path


def check_sidecar(plan: Path, device: dict, bundle_path: Path, precision: str) -> dict:
    """Refuse a plan built for another GPU or TensorRT version, naming both and the rebuild command."""
    path = sidecar_path(plan)
    rebuild = f"dermbatch build-engine --model {bundle_path} --target tensorrt --precision {precision}"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{plan}: no sidecar {path.name}, so its GPU and TensorRT version are unknown; "
                           f"rebuild it: {rebuild}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(f"{path}: unreadable sidecar ({exc}); rebuild the plan: {rebuild}") from None
    for key in ("tensorrt", "compute_capability", "gpu"):
        if str(info.get(key)) != str(device[key]):
            raise BackendError(f"{plan}: built for {key} {info.get(key)}, this machine has {device[key]}; "
                               f"plans are not portable, rebuild it here: {rebuild}")
    return info
