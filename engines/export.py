"""ONNX export of a bundle's fold models: one function, named tensors, dynamic batch axis only, checked.

``export_folds`` writes one graph per task holding the selected folds with their outputs stacked
(``logits``: (F, N, …)), or one graph per fold; ``compare`` runs ONNX Runtime beside torch on the same
inputs and reports the largest logit difference.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermbatch.backends.store import INPUT, OUTPUT
from dermbatch.bundle import Bundle

log = logging.getLogger(__name__)
OPSET = 17


class StackedFolds(nn.Module):
    """All folds in one graph: the ONNX Runtime session runs them in one call, outputs stacked on axis 0.

    Folds that differ only in their classifier (a frozen shared backbone) compute the features once.
    """

    def __init__(self, models: list[nn.Module]):
        from dermbatch.models import SharedBackboneFolds, shares_backbone

        super().__init__()
        self.folds = nn.ModuleList(models)
        self.shared = SharedBackboneFolds(models) if shares_backbone(models) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared(images)
        return torch.stack([model(images) for model in self.folds])


def export_module(module: nn.Module, input_size: tuple[int, int], path: Path, half: bool = False) -> Path:
    """Export with a dynamic batch axis; ``half`` exports fp16 weights and tensors (for TensorRT 11)."""
    module = module.eval()
    example = torch.zeros(2, 3, *input_size)
    if half:  # a copy: the caller's fp32 module stays the reference the plan is checked against
        module, example = copy.deepcopy(module).half().cuda(), example.half().cuda()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {1 if isinstance(module, StackedFolds) else 0:
                                                                      "batch"}},
                          opset_version=OPSET, dynamo=False)
    import onnx

    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return path


def load_stacked(bundle: Bundle, task: str, folds: tuple[int, ...]) -> StackedFolds:
    from dermbatch.models import load_fold_model

    return StackedFolds([load_fold_model(bundle, task, f) for f in folds]).eval()


@torch.no_grad()
def compare(path: Path, module: nn.Module, x: np.ndarray, task: str) -> dict:
    """ONNX Runtime (CPU) vs torch on ``x``: max abs logit difference and top-1 / mask agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run([OUTPUT], {INPUT: x})[0]
    reference = module(torch.from_numpy(x)).numpy()
    result = {"max_abs_diff": float(np.abs(ours - reference).max())}
    if task == "classification":  # (F, N, K)
        result["top1_agreement"] = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    else:
        result["mask_agreement"] = float(((ours > 0) == (reference > 0)).mean())
    return result
