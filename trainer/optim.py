"""AdamW with differential learning rates (backbone vs head) and per-step schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from dermbatch.errors import UsageError

SCHEDULES = ("cosine", "sgdr", "onecycle")


def head_parameters(model: nn.Module, task: str) -> set[int]:
    """ids of the parameters outside the pretrained backbone: the U-Net decoder and head, the classifier."""
    if task == "segmentation":
        head = [model.decoder, model.segmentation_head]
    else:
        head = [model.get_classifier()]
    return {id(p) for module in head for p in module.parameters()}


def make_optimizer(model: nn.Module, task: str, lr: float, backbone_lr_mult: float,
                   weight_decay: float) -> torch.optim.AdamW:
    head = head_parameters(model, task)
    groups = [{"params": [p for p in model.parameters() if id(p) not in head], "lr": lr * backbone_lr_mult,
               "name": "backbone"},
              {"params": [p for p in model.parameters() if id(p) in head], "lr": lr, "name": "head"}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0, cycle: int = 0, cycle_mult: float = 2.0,
              min_factor: float = 0.01) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule {schedule!r}: choose {', '.join(SCHEDULES)}")
    if schedule == "onecycle":  # linear warm-up over 30 %, then cosine annealing to ~0
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        t = (step - peak) / max(1, total - peak)
        return min_factor * 0.01 + (1 - min_factor * 0.01) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:
        return (step + 1) / warmup
    step, total = step - warmup, max(1, total - warmup)
    if schedule == "cosine":
        t = step / total
    else:  # sgdr: warm restarts, each cycle cycle_mult times longer than the last
        length = max(1, cycle or total // 3)
        while step >= length:
            step -= length
            length = max(1, int(length * cycle_mult))
        t = step / length
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float, frozen_backbone: bool) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = 0.0 if frozen_backbone and group.get("name") == "backbone" else base * factor
