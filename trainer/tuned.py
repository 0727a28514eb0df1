"""``dermbatch train --task cls --tune-stages K``: k-fold fine-tuning of the upper stages, fast on a CPU.

The stem and the first K block stages keep their ImageNet weights. Their output is computed once per image
and view and cached (fp16, ``checkpoints/cls_trunk.npy``): the 8 dihedral views of the exact crop
``dermbatch run`` makes, and ``--jitter-views`` more, each a random scale/shift crop with a random dihedral
view and colour jitter. Training then runs only the upper stages on cached tensors: every step draws one
cached view per image, so the frozen part costs nothing after the first pass.

Per fold, only small tensors are learnt, and only they are stored (``cls_fold<k>.safetensors``, a few
hundred kB; the ImageNet backbone is stored once in ``cls_shared.safetensors``):
- a rank-R update (``lora_a`` (R, in), ``lora_b`` (out, R); LoRA) of every 1x1 convolution of stages K and
  later and of the head convolution; ``dermbatch.models.merge_low_rank`` folds it into the weights when the
  bundle is loaded, so the model that runs is an ordinary ``timm-multistage`` classifier;
- the batch-norm scales and shifts of those stages (their running statistics stay the ImageNet ones: every
  layer runs in inference mode, in training too);
- the linear classifier on the pooled statistics of every stage, initialised from a linear probe (LP-FT).

The schedule is fixed (no epoch is chosen on the held-out fold), and the out-of-fold predictions are made
with the fold's merged model on the exact crops with the bundle's TTA, as ``dermbatch run`` makes them.
Every epoch is checkpointed; ``--resume`` continues a fold where it stopped.

On ``--device cuda`` the trunk, the tuned stages and the out-of-fold pass run on the GPU (training steps in
bfloat16 autocast); ``--workers`` processes make the cached views in parallel on any device. The draws are the
same on every device: they come from CPU generators seeded by (seed, fold, epoch, image).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermbatch.bundle import CLASSES, ModelSpec, save_weights
from dermbatch.errors import UsageError
from dermbatch.models import build_model, merge_low_rank
from dermbatch.preprocess import normalize, resize_rgb
from trainer.augment import jitter_crop, photometric
from trainer.dataset import TrainingSet
from trainer.fit import _append_csv, derived_seed
from trainer.frozen import class_logits
from trainer.metrics import classification_metrics
from trainer.oof import classification_oof, write_rows
from trainer.optim import lr_factor
from trainer.task import existing_manifest, make_loss, new_model, update_manifest

log = logging.getLogger(__name__)
D4_VIEWS = 8  # cached views 0..7: rot90^(k % 4), then a horizontal flip for k >= 4
FLIP_VIEWS = (0, 4, 6, 2)  # identity, horizontal, vertical, both: the "flip" TTA among the cached views
PROBE_C = 3e-4  # the linear probe's inverse L2 strength: the one the frozen recipe's inner CV chose in every fold


def d4_view(image: np.ndarray, k: int) -> np.ndarray:
    view = np.rot90(image, k % 4)
    return np.ascontiguousarray(view[:, ::-1] if k >= 4 else view)


def training_views(arrays: dict, spec: ModelSpec, jitter: int, rng: np.random.Generator) -> np.ndarray:
    """(8 + jitter, 3, H, W) normalised inputs: the exact crop's dihedral views, then jittered crops."""
    views = [d4_view(arrays["crop"], k) for k in range(D4_VIEWS)]
    for _ in range(jitter):
        crop = resize_rgb(jitter_crop(rng, arrays["loose"], float(arrays["inner"])), spec.input_size)
        views.append(photometric(rng, d4_view(crop, int(rng.integers(D4_VIEWS)))))
    return np.stack([normalize(v, spec) for v in views])


class _Views(torch.utils.data.Dataset):
    """Image ``start + i``'s training views (``training_views``), drawn from its own generator: the same in any
    worker process and in any order."""

    def __init__(self, dataset: TrainingSet, spec: ModelSpec, jitter: int, seed: int, start: int):
        self.dataset, self.spec, self.jitter, self.seed, self.start = dataset, spec, jitter, seed, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.start + i
        rng = np.random.default_rng([self.seed, 17, row])
        return torch.from_numpy(training_views(self.dataset.arrays(row), self.spec, self.jitter, rng))


def autocast(device: str):
    """bfloat16 autocast on CUDA (mixed precision); nothing on the CPU (no bf16 units here)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))


def _on(array, device: str) -> torch.Tensor:
    """A float32 tensor on ``device`` from cached fp16 rows (converted there: half the bytes to move)."""
    return torch.from_numpy(np.asarray(array)).to(device).float()


class LowRankConv(nn.Module):
    """A frozen 1x1 convolution plus a trainable rank-``rank`` update: ``conv(x) + b(a(x))``; ``b`` starts at 0."""

    def __init__(self, conv: nn.Conv2d, rank: int, seed: int):
        super().__init__()
        self.conv = conv
        generator = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(torch.randn(rank, conv.in_channels, generator=generator) / conv.in_channels ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(conv.out_channels, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.conv2d(F.conv2d(x, self.lora_a[:, :, None, None]), self.lora_b[:, :, None, None])
        return self.conv(x) + update


class TunedTop(nn.Module):
    """A fold's trainable model: the multistage classifier from stage ``stage`` on, with low-rank updates, over
    the cached trunk outputs; its classifier reads standardised features (``mu``, ``sd``), folded away when the
    fold is saved."""

    def __init__(self, model, stage: int, rank: int, seed: int, depthwise: bool = False):
        super().__init__()
        self.model, self.stage = model, stage
        b = model.backbone
        if rank > 0:
            convs = [(block, name) for stage_blocks in b.blocks[stage:] for block in stage_blocks
                     for name in ("conv_pw", "conv_pwl") if getattr(block, name, None) is not None
                     and getattr(block, name).kernel_size == (1, 1)] + [(b, "conv_head")]
            for i, (owner, name) in enumerate(convs):
                setattr(owner, name, LowRankConv(getattr(owner, name), rank, seed + i))
        for p in model.parameters():
            p.requires_grad = False
        for module in [*b.blocks[stage:].modules(), b.bn2]:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad = module.bias.requires_grad = True
            elif isinstance(module, LowRankConv):
                module.lora_a.requires_grad = module.lora_b.requires_grad = True
            elif depthwise and isinstance(module, nn.Conv2d) and module.groups > 1:
                module.weight.requires_grad = True  # depthwise kernels are small: tuned whole
        if isinstance(b.conv_head, LowRankConv):
            b.conv_head.lora_a.requires_grad = b.conv_head.lora_b.requires_grad = True
        model.classifier.weight.requires_grad = model.classifier.bias.requires_grad = True
        self.register_buffer("mu", torch.zeros(model.num_features))
        self.register_buffer("sd", torch.ones(model.num_features))
        self.eval()

    def train(self, mode: bool = True):  # batch norm keeps its ImageNet statistics: always inference mode
        return super().train(False)

    def features(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.features_from(x, pooled, self.stage)

    def forward(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.classifier((self.features(x, pooled) - self.mu) / self.sd)

    def fold_state(self) -> dict[str, torch.Tensor]:
        """What this fold stores: low-rank updates, tuned batch-norm affines, the de-standardised classifier."""
        state = {name: p for name, p in self.model.named_parameters()
                 if p.requires_grad and not name.startswith("classifier.")}
        weight = self.model.classifier.weight / self.sd
        state["classifier.weight"] = weight
        state["classifier.bias"] = self.model.classifier.bias - weight @ self.mu
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def shared_state(model, fold_keys: set[str]) -> dict[str, torch.Tensor]:
    """The frozen ImageNet tensors every fold shares (stored once), in the plain model's names."""
    return {k: v for k, v in model.state_dict().items() if k not in fold_keys and not k.startswith("classifier.")}


@torch.no_grad()
def cache_trunk(model, spec: ModelSpec, dataset: TrainingSet, stage: int, jitter: int, seed: int, path: Path,
                progress=None, device: str = "cpu", workers: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """(trunk outputs (N, V, C, h, w) fp16, pooled stage statistics (N, V, D) fp32, images/s): read from
    ``path`` when made with the same settings for the same images, else computed (and saved there). A cache made
    with the same settings for the first images only (e.g. before ``--extra-images`` were added) keeps those
    rows and computes the rest: every image's views are drawn from (seed, its row), so the rows are the same.
    The trunk runs on ``device``; ``workers`` processes make the views."""
    settings = json.loads(json.dumps({"spec": asdict(spec) | {"folds": None}, "stage": stage, "jitter": jitter,
                                      "seed": seed}, default=str))
    ids = [i.image_id for i in dataset.items]
    key = json.dumps(settings | {"ids": ids}, sort_keys=True)
    meta = path.with_suffix(".json")
    saved = json.loads(meta.read_text()) if meta.exists() else {}
    if saved.get("key") == key:
        log.info("classification: reusing the cached trunk outputs in %s", path)
        return (np.load(path, mmap_mode="r"), np.load(path.with_name(path.stem + "_stats.npy")),
                saved["images_per_s"])
    before = json.loads(saved["key"]) if saved else {}
    kept = len(before["ids"]) if before and before | {"ids": None} == settings | {"ids": None} \
        and 0 < len(before["ids"]) < len(ids) and ids[:len(before["ids"])] == before["ids"] else 0
    if kept:
        log.info("classification: keeping the cached trunk outputs of the first %d images in %s, computing %d more",
                 kept, path, len(ids) - kept)
    model = copy.deepcopy(model).to(device).eval()
    views = D4_VIEWS + jitter
    task_id = progress.add_task("classification: frozen trunk, once", total=len(ids) - kept) if progress else None
    start, trunk, stats = time.perf_counter(), None, None
    loader = torch.utils.data.DataLoader(_Views(dataset, spec, jitter, seed, kept), batch_size=None,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    for i, x in enumerate(loader, kept):
        out, pooled = model.trunk(x.to(device), stage)
        out, pooled = out.cpu(), pooled.cpu()
        if trunk is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            trunk = np.lib.format.open_memmap(path.with_name(path.stem + ".tmp.npy"), mode="w+", dtype=np.float16,
                                              shape=(len(dataset), views, *out.shape[1:]))
            stats = np.zeros((len(dataset), views, pooled.shape[1]), np.float32)
            if kept:
                old = np.load(path, mmap_mode="r")
                for rows in np.array_split(np.arange(kept), max(1, kept // 512)):
                    trunk[rows] = old[rows]
                stats[:kept] = np.load(path.with_name(path.stem + "_stats.npy"))
                del old
        trunk[i], stats[i] = out.numpy(), pooled.numpy()
        if progress:
            progress.update(task_id, advance=1)
    if progress:
        progress.remove_task(task_id)
    speed = (len(ids) - kept) / (time.perf_counter() - start)
    trunk.flush()
    del trunk
    # each file is written beside its place, then moved there: a cut run leaves the old cache whole, and a cache
    # hard-linked from another run is replaced here, never written through
    np.save(path.with_name(path.stem + "_stats.tmp.npy"), stats)
    meta.with_suffix(".tmp").write_text(json.dumps({"key": key, "images_per_s": speed}))
    meta.unlink(missing_ok=True)  # a cut from here on: no key, so the cache is recomputed, never mismatched
    os.replace(path.with_name(path.stem + "_stats.tmp.npy"), path.with_name(path.stem + "_stats.npy"))
    os.replace(path.with_name(path.stem + ".tmp.npy"), path)
    os.replace(meta.with_suffix(".tmp"), meta)
    return np.load(path, mmap_mode="r"), stats, speed


def _batches(trunk, stats, rows: np.ndarray, view: int, size: int = 256, device: str = "cpu"):
    for start in range(0, len(rows), size):
        idx = rows[start:start + size]
        yield _on(trunk[idx, view], device), torch.from_numpy(stats[idx, view]).to(device)


def _device(top: nn.Module) -> str:
    return str(next(top.parameters()).device)


@torch.no_grad()
def _features(top: TunedTop, trunk, stats, rows: np.ndarray, view: int) -> torch.Tensor:
    return torch.cat([top.features(x, p).cpu() for x, p in _batches(trunk, stats, rows, view, device=_device(top))])


@torch.no_grad()
def cached_flip_probs(top: TunedTop, trunk, stats, rows: np.ndarray) -> np.ndarray:
    """Probabilities averaged in logit space over the flip views (a quick per-epoch check, not the OOF)."""
    device = _device(top)
    logits = sum(torch.cat([top(x, p).cpu() for x, p in _batches(trunk, stats, rows, v, device=device)])
                 for v in FLIP_VIEWS)
    return torch.softmax(logits / len(FLIP_VIEWS), 1).numpy()


def linear_probe(top: TunedTop, trunk, stats, rows: np.ndarray, labels: np.ndarray, seed: int) -> None:
    """Standardise the features on the fold's training images and start the classifier from a class-weighted
    logistic regression on them (the LP of LP-FT)."""
    from sklearn.linear_model import LogisticRegression

    feats = _features(top, trunk, stats, rows, 0)
    top.mu.copy_(feats.mean(0))
    top.sd.copy_(feats.std(0) + 1e-3)
    x = ((feats - feats.mean(0)) / (feats.std(0) + 1e-3)).numpy()
    counts = np.bincount(labels, minlength=len(CLASSES))
    present = np.flatnonzero(counts)
    probe = LogisticRegression(C=PROBE_C, max_iter=2000, random_state=seed,
                               class_weight={int(c): len(labels) / (len(present) * counts[c]) for c in present})
    probe.fit(x, labels)
    weight, bias = class_logits(probe)
    top.model.classifier.weight.data.copy_(torch.from_numpy(weight))
    top.model.classifier.bias.data.copy_(torch.from_numpy(bias))


def fit_top(top: TunedTop, trunk, stats, rows: np.ndarray, labels: np.ndarray, loss_fn, cfg, fold: int,
            checkpoint: Path, log_csv: Path, resume: bool, check_rows: np.ndarray | None, progress=None) -> None:
    """The fold's epochs over cached views: AdamW, head at ``cfg.lr``, the rest at ``lr * backbone_lr_mult``,
    the per-step schedule of ``cfg.schedule``, on ``cfg.device``; a checkpoint after every epoch. ``check_rows``
    are scored after the last epoch only, for the log (none chosen by it): scoring them every epoch cost as much
    as training did."""
    top.to(cfg.device)
    loss_fn.to(cfg.device)
    head = [top.model.classifier.weight, top.model.classifier.bias]
    body = [p for p in top.parameters() if p.requires_grad and all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.lr * cfg.backbone_lr_mult},
                                   {"params": head, "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = max(1, len(rows) // cfg.batch_size)
    first = 0
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=cfg.device, weights_only=True)
        top.load_state_dict(saved["top"])
        optimizer.load_state_dict(saved["optimizer"])
        first = int(saved["epoch"])
        log.info("classification fold %d: resumed after epoch %d", fold, first)
    views = trunk.shape[1]
    for epoch in range(first, cfg.epochs):
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, fold, epoch, 5))
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        chosen = torch.randint(0, views, (len(rows),), generator=generator).numpy()
        task_id = progress.add_task(f"classification fold {fold} epoch {epoch + 1}/{cfg.epochs}",
                                    total=steps_per_epoch) if progress else None
        start, running = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            factor = lr_factor(cfg.schedule, epoch * steps_per_epoch + step, steps_per_epoch * cfg.epochs,
                               cfg.warmup_steps, cfg.sgdr_cycle_epochs * steps_per_epoch)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            batch = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            idx, v = order[batch], chosen[batch]
            x, pooled = _on(trunk[idx, v], cfg.device), torch.from_numpy(stats[idx, v]).to(cfg.device)
            with autocast(cfg.device):
                logits = top(x, pooled)
            loss = loss_fn(logits.float(), torch.from_numpy(labels[idx]).to(cfg.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            if progress:
                progress.update(task_id, advance=1)
        seconds = time.perf_counter() - start
        if progress:
            progress.remove_task(task_id)
        check = classification_metrics(cached_flip_probs(top, trunk, stats, check_rows), labels[check_rows]) \
            if check_rows is not None and epoch + 1 == cfg.epochs else {"balanced_accuracy": "", "macro_auc": ""}
        row = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch,
               "val_balanced_accuracy": check["balanced_accuracy"], "val_macro_auc": check["macro_auc"],
               "lr": base_lrs[-1] * factor, "seconds": seconds,
               "train_images_per_s": steps_per_epoch * cfg.batch_size / seconds}
        _append_csv(log_csv, row)
        scored = f", held-out BA {check['balanced_accuracy']:.4f} AUC {check['macro_auc']:.4f} (logged, not used " \
            "to choose)" if check["balanced_accuracy"] != "" else ""
        log.info("classification fold %d epoch %d: train loss %.4f%s, %.0f img/s", fold, epoch + 1,
                 row["train_loss"], scored, row["train_images_per_s"])
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"top": top.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                   checkpoint.with_name(checkpoint.name + ".tmp"))
        os.replace(checkpoint.with_name(checkpoint.name + ".tmp"), checkpoint)


PRIOR_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # tau of the prior correction, chosen by the inner split
TEMPERATURE_GRID = tuple(float(t) for t in np.geomspace(0.25, 4.0, 25))  # chosen by the inner split's log loss


def inner_calibration(probs: np.ndarray, labels: np.ndarray, prior: np.ndarray) -> tuple[float, float, dict]:
    """(temperature, tau, balanced accuracy by tau) from one inner split's predictions: the temperature with
    the lowest log loss, then the tau whose adjustment ``logit_c / T - tau * log(prior_c)`` gives the highest
    balanced accuracy (ties: the smaller tau)."""
    log_p = np.log(probs + 1e-12)
    rows = np.arange(len(labels))

    def log_loss(t: float) -> float:
        z = log_p / t
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[rows, labels]))

    temperature = min(TEMPERATURE_GRID, key=log_loss)
    scores = {}
    for tau in PRIOR_GRID:
        adjusted = log_p / temperature - tau * np.log(prior)
        scores[tau] = classification_metrics(np.exp(adjusted - adjusted.max(1, keepdims=True)), labels)[
            "balanced_accuracy"]
    return temperature, max(scores, key=scores.get), scores


def prior_correction(opts, base, trunk, stats, rows: np.ndarray, items: list, fold: int,
                     progress=None) -> tuple[float, float]:
    """(temperature, tau) of the fold's calibration ``logit_c / T - tau * log(prior_c)`` (prior: the fold's
    training class frequencies), both chosen on an inner split of the fold's own training images (grouped by
    lesion, a third held out; extra images stay on the training side) from a model trained there for half the
    epochs: T by log loss, then tau by balanced accuracy. The held-out fold is never looked at. ``items``: the
    HAM images then the extra ones, as the cache rows."""
    from dataclasses import replace

    from sklearn.model_selection import StratifiedGroupKFold

    memo = opts.out / "checkpoints" / f"cls_fold{fold}_tau.json"
    if opts.resume and memo.exists():
        saved = json.loads(memo.read_text())
        return float(saved.get("temperature", 1.0)), float(saved["tau"])
    labels = np.array([i.label for i in items])
    groups = [i.group or i.image_id for i in items]
    own = np.array([not groups[i].startswith("extra:") for i in rows])
    splitter = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=opts.fit.seed)
    with warnings.catch_warnings():  # a class with fewer than 3 lesions: sklearn says so, the split still holds
        warnings.simplefilter("ignore", UserWarning)
        inner_train, inner_val = next(splitter.split(rows[own], labels[rows[own]], [groups[i] for i in rows[own]]))
    inner_train = np.concatenate([rows[own][inner_train], rows[~own]])
    inner_val = rows[own][inner_val]
    top = TunedTop(copy.deepcopy(base), opts.tune_stages, opts.lora_rank,
                   derived_seed(opts.fit.seed, fold, 1, 6) % 2**31, opts.tune_depthwise).to(opts.fit.device)
    linear_probe(top, trunk, stats, inner_train, labels[inner_train], opts.fit.seed)
    (opts.out / "logs" / f"cls_fold{fold}_inner.csv").unlink(missing_ok=True)
    cfg = replace(opts.fit, epochs=max(1, opts.fit.epochs // 2))
    fit_top(top, trunk, stats, inner_train, labels, make_loss(opts, [items[i] for i in inner_train]),
            cfg, fold, opts.out / "checkpoints" / f"cls_fold{fold}_inner.pt",
            opts.out / "logs" / f"cls_fold{fold}_inner.csv", False, None, progress)
    probs = cached_flip_probs(top, trunk, stats, inner_val)
    prior = np.maximum(np.bincount(labels[inner_train], minlength=len(CLASSES)) / len(inner_train), 1e-6)
    temperature, tau, scores = inner_calibration(probs, labels[inner_val], prior)
    log.info("classification fold %d: inner split: temperature %.3g by log loss; balanced accuracy by prior "
             "correction tau %s -> tau=%g", fold, temperature, {f"{t:g}": round(v, 4) for t, v in scores.items()},
             tau)
    (opts.out / "checkpoints" / f"cls_fold{fold}_inner.pt").unlink(missing_ok=True)
    memo.write_text(json.dumps({"temperature": temperature, "tau": tau, "inner_balanced_accuracy": scores}))
    return temperature, tau


def train_tuned(opts, spec: ModelSpec, fold_of: dict[str, int], done: list[int], weights: dict, provenance: dict,
                cache: Path, progress=None) -> None:
    """Every fold not in ``done``: fine-tune its upper stages on the cached trunk, save it and its OOF rows."""
    base = new_model(opts, spec, 0)  # ImageNet weights; every fold starts from a copy
    stage = opts.tune_stages
    if not 1 <= stage < len(base.backbone.blocks):
        raise UsageError(f"--tune-stages {stage}: {spec.encoder} has stages 0..{len(base.backbone.blocks) - 1}; "
                         "freeze at least one and tune at least one")
    everything = [*opts.items, *opts.extra_items]  # the extra images: training side of every fold only
    dataset = TrainingSet(everything, opts.task, spec, opts.crop, cache, False, opts.fit.seed, opts.preprocessing)
    trunk, stats, speed = cache_trunk(base, spec, dataset, stage, opts.jitter_views, opts.fit.seed,
                                      opts.out / "checkpoints" / "cls_trunk.npy", progress, opts.fit.device,
                                      opts.fit.workers)
    labels = np.array([i.label for i in everything])
    folds = np.array([fold_of[i.image_id] for i in opts.items] + [-1] * len(opts.extra_items))
    fold_keys = set(TunedTop(copy.deepcopy(base), stage, opts.lora_rank, 0, opts.tune_depthwise).fold_state())
    shared = shared_state(base, fold_keys)
    name, digest = save_weights(opts.out, opts.task, None, shared)
    weights[name] = digest
    earlier = (existing_manifest(opts.out) or {}).get("provenance", {}).get("classification", {})
    provenance["tuned_stages"] = earlier.get("tuned_stages") if done and earlier.get("tuned_stages") else {
        "from_stage": stage, "lora_rank": opts.lora_rank, "depthwise": opts.tune_depthwise,
        "jitter_views": opts.jitter_views, "extra_training_images": len(opts.extra_items),
        "dihedral_views": D4_VIEWS, "probe_c": PROBE_C, "trunk_images_per_s": round(speed, 1)}
    for fold in range(opts.folds):
        if fold in done:
            log.info("classification fold %d: already in the bundle, skipped", fold)
            continue
        rows, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        log.info("classification fold %d: %d training, %d held-out images; stages %d.. tuned (rank %d%s)", fold,
                 len(rows), len(held), stage, opts.lora_rank, ", depthwise kernels" if opts.tune_depthwise else "")
        seed = derived_seed(opts.fit.seed, fold, 0, 6) % 2**31
        top = TunedTop(copy.deepcopy(base), stage, opts.lora_rank, seed, opts.tune_depthwise).to(opts.fit.device)
        checkpoint = opts.out / "checkpoints" / f"cls_fold{fold}_tuned.pt"
        log_csv = opts.out / "logs" / f"cls_fold{fold}.csv"
        temperature, tau = prior_correction(opts, base, trunk, stats, rows, everything, fold, progress) \
            if opts.prior_correction else (1.0, 0.0)
        if not (opts.resume and checkpoint.exists()):
            log_csv.unlink(missing_ok=True)
            linear_probe(top, trunk, stats, rows, labels[rows], opts.fit.seed)
        fit_top(top, trunk, stats, rows, labels, make_loss(opts, [everything[i] for i in rows]), opts.fit, fold,
                checkpoint, log_csv, opts.resume, held, progress)
        state = top.fold_state()
        prior = np.maximum(np.bincount(labels[rows], minlength=len(CLASSES)) / len(rows), 1e-6)
        state["classifier.weight"] /= temperature  # the calibration, folded into the classifier
        state["classifier.bias"] = state["classifier.bias"] / temperature \
            - tau * torch.from_numpy(np.log(prior)).float()
        if opts.prior_correction:
            provenance["tuned_stages"].setdefault("temperature", {})[str(fold)] = round(temperature, 4)
        provenance["tuned_stages"].setdefault("prior_tau", {})[str(fold)] = tau
        model = build_model(spec, len(CLASSES))  # the fold as the bundle will load it
        model.load_state_dict(merge_low_rank(shared | state))
        held_set = TrainingSet([opts.items[i] for i in held], opts.task, spec, opts.crop, cache, False,
                               opts.fit.seed, opts.preprocessing)
        oof = classification_oof(model.to(opts.fit.device), spec, held_set, opts.fit.device)
        write_rows(opts.out / "oof" / f"cls_fold{fold}.csv", oof, fold)
        name, digest = save_weights(opts.out, opts.task, fold, state)
        weights[name] = digest
        done.append(fold)
        update_manifest(opts, spec, done, weights, provenance)
        checkpoint.unlink(missing_ok=True)
        probs = np.array([[r[c] for c in CLASSES] for r in oof])
        score = classification_metrics(probs, np.array([CLASSES.index(r["label"]) for r in oof]))
        log.info("classification fold %d: out-of-fold balanced accuracy %.4f, macro AUC %.4f; saved %s", fold,
                 score["balanced_accuracy"], score["macro_auc"], name)
        if not math.isfinite(score["macro_auc"]):
            log.warning("classification fold %d: macro AUC undefined (a class missing from its held-out images)",
                        fold)
