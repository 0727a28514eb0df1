"""Grad-CAM (Selvaraju et al. 2017) and guided Grad-CAM of the classifier's predicted class over the crop.

Heatmaps are computed with the bundle's torch classifier folds (whatever backend made the prediction),
one map per fold (at the second-to-last stage of the backbone, see ``target_layer``), each scaled to [0, 1],
then averaged over the folds. No TTA:
a heatmap explains the plain view of the crop. The maths are pure functions over a model; drawing is
apart from them; ``Explainer`` only loads the folds and applies both to pipeline results.
"""

from __future__ import annotations

import copy
import logging

import cv2
import numpy as np
import torch
from torch import nn

from dermbatch.bundle import Bundle
from dermbatch.heatmap import blend_heatmap, enlarge, guided_image, heat_in_mask  # noqa: F401  (re-exported)
from dermbatch.preprocess import model_input

log = logging.getLogger(__name__)



def target_layer(model: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM reads: for timm's EfficientNet/MobileNet family, the output of the second-to-last stage
    (``blocks[-2]``); None means the final feature map (``forward_features``).

    Why not the last stage: on a fine-tuned classifier (the previous default bundle's), maps from the last
    stage and the 1x1 head put the heat around the lesion, not on it (more heat on the true lesion than a
    uniform map would put there: 10-15 % of 40 HAM10000 images, against 85 % for ``blocks[-2]``; see the README). For a
    ``timm-multistage`` classifier on a frozen ImageNet backbone it is the last stage, ``backbone.blocks[-1]``:
    90 % and 82 % on two disjoint sets of 40 images, against 68 % for ``blocks[-2]``.
    """
    if hasattr(model, "backbone"):  # timm-multistage: a frozen ImageNet backbone read at every stage
        return model.backbone.blocks[-1]
    blocks = getattr(model, "blocks", None)
    return blocks[-2] if isinstance(blocks, nn.Sequential) and len(blocks) >= 2 else None


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) Grad-CAM of ``classes`` (B,): ReLU(sum_k mean(dy/dA_k) * A_k) over the activations A of
    ``target_layer(model)``, each map scaled to max 1 (all zeros when nothing speaks for the class)."""
    layer = target_layer(model)
    captured: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)  # a graph even for frozen weights
        if layer is None:
            features = model.forward_features(x)
            logits = model.forward_head(features)
        else:
            handle = layer.register_forward_hook(lambda _m, _inputs, output: captured.__setitem__("a", output))
            try:
                logits = model(x)
            finally:
                handle.remove()
            features = captured["a"]
        score = logits.gather(1, classes[:, None]).sum()
        (grads,) = torch.autograd.grad(score, features)
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1)).detach()
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return cam / peak


def guided_backprop(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) guided backpropagation (Springenberg et al. 2015): the input gradient of the class score with
    every ReLU passing back only positive gradients. ``model`` must have no in-place activations."""
    handles = [m.register_full_backward_hook(lambda _m, grad_in, _out: (grad_in[0].clamp(min=0),))
               for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            score = model(x).gather(1, classes[:, None]).sum()
            (grads,) = torch.autograd.grad(score, x)
    finally:
        for handle in handles:
            handle.remove()
    return grads.detach()


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy whose activations do not work in place (backward hooks need the original outputs)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def fold_average_cam(models: list[nn.Module], x: torch.Tensor, classes: torch.Tensor,
                     size: tuple[int, int]) -> np.ndarray:
    """Fold-averaged Grad-CAM, upsampled to ``size`` (H, W): (B, H, W) float32 in [0, 1]."""
    maps = [nn.functional.interpolate(grad_cam(m, x, classes)[:, None], size=size, mode="bilinear",
                                      align_corners=False)[:, 0] for m in models]
    return torch.stack(maps).mean(0).clamp(0, 1).cpu().numpy().astype(np.float32)


class Explainer:
    """Loads the classifier folds in torch and attaches ``heatmap`` (and ``guided``) to pipeline results."""

    def __init__(self, bundle: Bundle, folds: tuple[int, ...], device: str = "auto", guided: bool = False,
                 backend_name: str = "torch"):
        from dermbatch.backends.torch import resolve_device
        from dermbatch.models import load_fold_model

        self.spec = bundle.spec("classification")
        self.device = resolve_device(device)
        self.models = [load_fold_model(bundle, "classification", f).to(self.device) for f in folds]
        self.guided_models = [without_inplace(m) for m in self.models] if guided else []
        if backend_name != "torch":
            log.info("explanations: Grad-CAM computed with the bundle's torch classifier folds %s on %s "
                     "(predictions come from %s)", ",".join(map(str, folds)), self.device, backend_name)
        else:
            log.info("explanations: Grad-CAM%s of the predicted class, folds %s averaged",
                     " and guided Grad-CAM" if guided else "", ",".join(map(str, folds)))

    def explain(self, results: list) -> None:
        """Set ``result.heatmap`` (float32 [0, 1] at crop size) and, if guided, ``result.guided`` (RGB)."""
        good = [r for r in results if r.ok and r.probabilities is not None]
        if not good:
            return
        x = torch.from_numpy(np.stack([model_input(r.crop, self.spec) for r in good])).to(self.device)
        classes = torch.tensor([int(np.argmax(r.probabilities)) for r in good], device=self.device)
        cams = fold_average_cam(self.models, x, classes, tuple(self.spec.input_size))
        guided = None
        if self.guided_models:
            guided = torch.stack([guided_backprop(m, x, classes) for m in self.guided_models]).mean(0).cpu().numpy()
        for i, result in enumerate(good):
            height, width = result.crop.shape[:2]
            result.heatmap = cv2.resize(cams[i], (width, height), interpolation=cv2.INTER_LINEAR)
            if guided is not None:
                image = guided_image(guided[i], cams[i])
                result.guided = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)

    def close(self) -> None:
        self.models.clear()
        self.guided_models.clear()
