"""TensorRT runtime: availability, the plan sidecar (``<task>.plan.json``) and its check, the runner by tensor
name, and the backend.

A plan is only valid for the TensorRT version and GPU model (compute capability) it was built with; the
sidecar records them, and a mismatch is refused with the exact rebuild command before the plan is
deserialised. Plans themselves stay untouched (no header), so trtexec and Polygraphy can load them.
``TrtRunner`` follows Polygraphy's runner: ``set_input_shape``, ``set_tensor_address`` and
``execute_async_v3`` on torch CUDA tensors, every return value checked, lifetime in a context manager.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from dermbatch.backends.base import TaskBackend, fold_selection
from dermbatch.backends.store import find_engine
from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError
from dermbatch.jsonfile import read_json

log = logging.getLogger(__name__)


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


def cpu_engine_target() -> str:
    """The CPU engine ``--backend auto`` prefers here: OpenVINO when installed, else ONNX Runtime."""
    import importlib.util

    return "openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"


def require_tensorrt(what: str) -> None:
    available, reason = tensorrt_available()
    if not available:
        cpu = cpu_engine_target()
        raise BackendError(f"{what} needs TensorRT and an NVIDIA GPU: {reason}. "
                           f"Use --backend {cpu} (build it with: dermbatch build-engine --target {cpu}) "
                           "or --backend torch")


def cuda_index(device: str) -> int | None:
    """``cuda:N`` -> N; ``auto``/``cuda`` -> None (the current device). TensorRT never runs on the CPU."""
    if device in ("auto", "cuda"):
        return None
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    if device == "cpu":
        raise BackendError(f"TensorRT runs on an NVIDIA GPU, not --device cpu; use --backend {cpu_engine_target()} "
                           "or --backend torch on the CPU")
    raise BackendError(f"--device {device!r}: choose auto, cuda or cuda:N for TensorRT")


def select_device(device: str) -> int:
    """Make ``device`` torch's current CUDA device (export, build and run all use the current one); its index."""
    import torch

    index = cuda_index(device)
    if index is not None:
        if index >= torch.cuda.device_count():
            raise BackendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(index)
    return torch.cuda.current_device()


def batch_plan(count: int, low: int, high: int) -> list[tuple[int, int, int]]:
    """(start, stop, size to run) chunks of ``count`` rows for a profile of MIN ``low`` and MAX ``high``: chunks of
    at most ``high``; one below ``low`` (the last chunk, a small set) is padded up to ``low`` and sliced back."""
    if not 1 <= low <= high:
        raise BackendError(f"optimisation profile MIN {low}, MAX {high}: need 1 <= MIN <= MAX")
    return [(start, min(count, start + high), max(low, min(count, start + high) - start))
            for start in range(0, count, high)]


def current_device() -> dict:
    """The GPU and TensorRT of this machine (torch's current CUDA device), in the sidecar's terms."""
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


def usable_plans(folder: Path, info: dict, device: dict, bundle_path: Path) -> str | None:
    """None when every task's plan in ``folder`` passes the sidecar check here, else why not (for ``auto``)."""
    try:
        for task in info.get("tasks", {}).values():
            check_sidecar(folder / task["file"], device, bundle_path, info.get("precision", "fp16"))
    except BackendError as exc:
        return str(exc)
    return None


def check_sidecar(plan: Path, device: dict, bundle_path: Path, precision: str) -> dict:
    """Refuse a plan built for another GPU or TensorRT version, naming both and the rebuild command."""
    path = sidecar_path(plan)
    rebuild = f"dermbatch build-engine --model {bundle_path} --target tensorrt --precision {precision}"
    try:
        info = read_json(path, BackendError, "plan sidecar")
    except FileNotFoundError:
        raise BackendError(f"{plan}: no sidecar {path.name}, so its GPU and TensorRT version are unknown; "
                           f"rebuild it: {rebuild}") from None
    except BackendError as exc:
        raise BackendError(f"{exc}; rebuild the plan: {rebuild}") from None
    for key in ("tensorrt", "compute_capability", "gpu"):
        if str(info.get(key)) != str(device[key]):
            raise BackendError(f"{plan}: built for {key} {info.get(key)}, this machine has {device[key]}; "
                               f"plans are not portable, rebuild it here: {rebuild}")
    return info


class TrtRunner:
    def __init__(self, plan: Path):
        import tensorrt as trt
        import torch

        self.plan = plan
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan}: TensorRT could not deserialise the plan")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{plan}: could not create an execution context (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{plan}: expected one input and one output tensor, found {inputs} -> {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output)]
        low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.stream = torch.cuda.Stream()

    def __call__(self, x):
        """Outputs for any batch size: chunks within the profile, a short one padded to MIN and sliced back
        (the output's batch axis is 1 for a stacked-folds graph)."""
        import torch

        parts = []
        for start, stop, size in batch_plan(len(x), self.min_batch, self.max_batch):
            chunk = x[start:stop]
            if size > len(chunk):
                chunk = torch.cat([chunk, chunk[-1:].expand(size - len(chunk), *chunk.shape[1:])])
            parts.append(self._execute(chunk)[:, :stop - start])
        return torch.cat(parts, dim=1)

    def _execute(self, x):
        import torch

        x = x.to(self.input_dtype).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise BackendError(f"{self.plan}: input shape {tuple(x.shape)} is outside the plan's profile")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype,
                          device=x.device)
        if not self.context.set_tensor_address(self.input, x.data_ptr()):
            raise BackendError(f"{self.plan}: could not bind {self.input}")
        if not self.context.set_tensor_address(self.output, out.data_ptr()):
            raise BackendError(f"{self.plan}: could not bind {self.output}")
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"{self.plan}: execution failed")
        self.stream.synchronize()
        return out

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


class TrtBackend(TaskBackend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str = "auto", folds: dict[str, tuple[int, ...]] | None = None,
                 precision: str | None = None):
        require_tensorrt("--backend tensorrt")
        index = select_device(device)
        dev = current_device()
        found = find_engine(bundle, "tensorrt", precision, device_tag(dev))
        if found is None:
            raise BackendError(f"{bundle.path}: no TensorRT plan for {dev['gpu']} with TensorRT {dev['tensorrt']}; "
                               f"build it: dermbatch build-engine --model {bundle.path} --target tensorrt")
        self.folder, self.info = found
        self.precision, self.device = self.info["precision"], f"cuda:{index}"
        self.runners, self.select = {}, {}
        for task, wanted in (folds or {}).items():
            plan = self.folder / self.info["tasks"][task]["file"]
            check_sidecar(plan, dev, bundle.path, self.precision)
            self.select[task] = fold_selection(tuple(self.info["tasks"][task]["folds"]), wanted, str(plan))
            self.runners[task] = TrtRunner(plan)
        log.info("tensorrt %s plans %s on %s", self.precision, self.folder, dev["gpu"])

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x)).cuda(non_blocking=True)
        out = self.runners[task](xt).float().cpu().numpy()  # fp16 plans give fp16 outputs: float32 for the caller
        return out if self.select[task] is None else out[self.select[task]]

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "precision": self.precision, "engine": str(self.folder)}

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
