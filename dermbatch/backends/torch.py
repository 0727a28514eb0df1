"""PyTorch eager backend: CPU, or CUDA with fp16 autocast."""

from __future__ import annotations

import logging

import numpy as np
import torch

from dermbatch.backends.base import TaskBackend
from dermbatch.bundle import Bundle
from dermbatch.errors import BackendError
from dermbatch.models import SharedBackboneFolds, load_fold_model, shares_backbone

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; an unavailable cuda request is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA GPU; "
                               "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise BackendError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


class TorchBackend(TaskBackend):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "auto", folds: dict[str, tuple[int, ...]] | None = None,
                 max_batch: int | None = None, precision: str | None = None):
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        if precision not in (None, "fp32", "fp16"):
            raise BackendError(f"--precision {precision}: the torch backend runs fp32, or fp16 autocast on CUDA; "
                               "int8 and bf16 need an engine: dermbatch build-engine --target onnxruntime "
                               "--precision int8, or --target openvino --precision bf16")
        if precision == "fp16" and self.torch_device.type != "cuda":
            raise BackendError("--precision fp16 with the torch backend needs a CUDA device")
        self.fp16 = self.torch_device.type == "cuda" if precision is None else precision == "fp16"
        # On CPU these CNNs run fastest at ~4 images per call and slow down past 8 (cache-bound):
        # EfficientNet-Lite0 U-Net 256px, channels_last, 2 cores: 19-21 img/s at 4, 15-17 at 16.
        self.max_batch = max_batch or (64 if self.torch_device.type == "cuda" else 4)
        self.models: dict[str, list[torch.nn.Module]] = {}
        for task, task_folds in (folds or {}).items():
            # channels_last: 1.1-1.9x faster for these CNNs on CPU (oneDNN), and the layout tensor cores want
            models = [load_fold_model(bundle, task, f).to(self.torch_device, memory_format=torch.channels_last)
                      for f in task_folds]
            self.models[task] = [SharedBackboneFolds(models)] if shares_backbone(models) else models
            log.info("%s: loaded folds %s on %s", task, ",".join(map(str, task_folds)), self.device)

    @torch.inference_mode()
    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(x).to(self.torch_device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        outputs = []  # each (F_i, N, ...): one fold, or all folds of a shared backbone
        for model in self.models[task]:
            chunks = []
            for start in range(0, xt.shape[0], self.max_batch):
                with torch.autocast(self.torch_device.type, dtype=torch.float16, enabled=self.fp16):
                    out = model(xt[start:start + self.max_batch]).float()
                chunks.append(out if isinstance(model, SharedBackboneFolds) else out[None])
            outputs.append(torch.cat(chunks, dim=1))
        return torch.cat(outputs).cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "fp16_autocast": self.fp16,
                "torch": torch.__version__, "threads": torch.get_num_threads()}

    def close(self) -> None:
        self.models.clear()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
