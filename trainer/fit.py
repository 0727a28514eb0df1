"""Training one fold: epochs with per-step LR schedule, validation, best checkpoint, early stopping, resume.

Every random draw is derived from (seed, fold, epoch[, index]), and the epoch checkpoint holds the model,
optimizer and counters, so an interrupted fold resumed with ``--resume`` follows the same path as an
uninterrupted one. Checkpoints are read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dermbatch.bundle import ModelSpec
from trainer import distributed
from trainer.dataset import TrainingSet
from trainer.distributed import ShardedOrder, per_rank_batch
from trainer.metrics import classification_metrics, jaccard, segmentation_metrics
from trainer.optim import lr_factor, make_optimizer, set_lr

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    schedule: str = "cosine"
    backbone_lr_mult: float = 0.1
    head_warmup_epochs: int = 0  # epochs with the backbone frozen
    warmup_steps: int = 0
    sgdr_cycle_epochs: int = 0
    weight_decay: float = 1e-4
    patience: int = 0  # early stopping after this many epochs without improvement; 0: off
    balanced_sampling: bool = False
    seed: int = 0
    workers: int = 2
    device: str = "cpu"


@dataclass
class FoldOutcome:
    best_state: dict
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of strings)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _loader(dataset: TrainingSet, cfg: FitConfig, train: bool, epoch: int, fold: int) -> DataLoader:
    """Validation: every image in order. Training: this rank's share of the epoch's seeded global order (all of
    it in one process), in per-rank batches of ``batch_size`` / processes."""
    if not train:
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, fold, epoch, 1))
    weights = None
    if cfg.balanced_sampling and dataset.task == "classification":
        labels = np.array([item.label for item in dataset.items])
        weights = 1.0 / np.bincount(labels)[labels]
    sampler = ShardedOrder(len(dataset), cfg.batch_size, generator, weights)
    return DataLoader(dataset, batch_size=per_rank_batch(cfg.batch_size), sampler=sampler,
                      num_workers=cfg.workers, persistent_workers=False)


@torch.no_grad()
def validate(model, dataset: TrainingSet, cfg: FitConfig, loss_fn) -> tuple[float, dict]:
    """Loss and the task's headline metrics at model resolution (thresholded Jaccard / balanced accuracy)."""
    model.eval()
    losses, outputs, targets = [], [], []
    for x, y in _loader(dataset, cfg, False, 0, 0):
        x, y = x.to(cfg.device), y.to(cfg.device)
        out = model(x)
        losses.append(float(loss_fn(out, y)) * len(x))
        outputs.append(out.float().cpu())
        targets.append(y.cpu())
    out, target = torch.cat(outputs), torch.cat(targets)
    if dataset.task == "segmentation":
        metrics = segmentation_metrics([jaccard(o[0].numpy() > 0, t[0].numpy() > 0.5) for o, t in zip(out, target,
                                                                                                        strict=True)])
        score = metrics["thresholded_jaccard"]
    else:
        metrics = classification_metrics(torch.softmax(out, 1).numpy(), target.numpy())
        metrics = {k: metrics[k] for k in ("balanced_accuracy", "accuracy", "macro_auc")}
        score = metrics["balanced_accuracy"]
    return sum(losses) / len(dataset), {"score": score, **metrics}


def fit_fold(model, spec: ModelSpec, train_set: TrainingSet, val_set: TrainingSet, loss_fn, cfg: FitConfig,
             fold: int, checkpoint: Path, log_csv: Path, resume: bool, progress=None) -> FoldOutcome:
    model.to(cfg.device)
    loss_fn.to(cfg.device)
    optimizer = make_optimizer(model, spec.task, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    main = distributed.is_main()  # under torchrun: rank 0 validates and writes, the others follow its decisions
    progress = progress if main else None
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = max(1, len(_loader(train_set, cfg, True, 0, fold)))
    total_steps = steps_per_epoch * cfg.epochs
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # every rank reads rank 0's file
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state = saved["best_model"]
        state = {k: saved[k] for k in state}
        if main:
            log.info("%s fold %d: resumed after epoch %d (best %.4f at epoch %d)", spec.task, fold, state["epoch"],
                     state["best_score"], state["best_epoch"])
    trained = distributed.wrap(model, cfg.device)  # DDP: gradients averaged over the processes
    for epoch in range(state["epoch"], cfg.epochs):
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            log.info("%s fold %d: early stop, no improvement for %d epochs", spec.task, fold, cfg.patience)
            break
        torch.manual_seed(derived_seed(cfg.seed, fold, epoch, 2))
        train_set.epoch = epoch
        frozen = epoch < cfg.head_warmup_epochs
        start, seen, running = time.perf_counter(), 0, 0.0
        model.train()
        loader = _loader(train_set, cfg, True, epoch, fold)
        task_id = progress.add_task(f"{spec.task} fold {fold} epoch {epoch + 1}/{cfg.epochs}",
                                    total=len(loader)) if progress else None
        for step, (x, y) in enumerate(loader):
            global_step = epoch * steps_per_epoch + step
            factor = lr_factor(cfg.schedule, global_step, total_steps, cfg.warmup_steps,
                               cfg.sgdr_cycle_epochs * steps_per_epoch)
            set_lr(optimizer, base_lrs, factor, frozen)
            x, y = x.to(cfg.device), y.to(cfg.device)
            loss = loss_fn(trained(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(x)
            seen += len(x)
            if progress:
                progress.update(task_id, advance=1)
        running, seen = distributed.sum_over_ranks(running, seen)
        train_seconds = time.perf_counter() - start
        if progress:
            progress.remove_task(task_id)
        val_loss, metrics = distributed.broadcast(validate(model, val_set, cfg, loss_fn) if main else None)
        row = {"epoch": epoch + 1, "train_loss": running / max(1, seen), "val_loss": val_loss,
               **{f"val_{k}": v for k, v in metrics.items()}, "lr": base_lrs[-1] * factor,
               "seconds": time.perf_counter() - start, "train_images_per_s": seen / train_seconds}
        state["history"].append(row)
        if main:
            _append_csv(log_csv, row)
        improved = metrics["score"] > state["best_score"]
        if improved:
            state.update(best_score=metrics["score"], best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if not main:
            continue
        log.info("%s fold %d epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s, %.1f img/s",
                 spec.task, fold, epoch + 1, row["train_loss"], val_loss, metrics["score"],
                 " (best)" if improved else "", row["train_images_per_s"])
        _save_checkpoint(checkpoint, model, optimizer, best_state, state)
    return FoldOutcome(best_state, state["best_epoch"], state["best_score"], state["history"])


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _save_checkpoint(path: Path, model, optimizer, best_state: dict, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_model": best_state,
                **state}, tmp)
    os.replace(tmp, path)
