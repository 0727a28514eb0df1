"""The learning-rate range test (Smith 2017): raise the LR exponentially each step, record the smoothed
loss, stop when it explodes, and suggest the rate where the loss falls fastest."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader


def lr_range_test(model, dataset, loss_fn, batch_size: int, device: str = "cpu", start_lr: float = 1e-6,
                  end_lr: float = 1.0, steps: int = 100, workers: int = 0, seed: int = 0):
    """Return (learning rates, smoothed losses, suggested rate)."""
    model.to(device).train()
    loss_fn.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=start_lr, weight_decay=1e-4)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    lrs, losses, smoothed, best = [], [], 0.0, math.inf
    batches = iter(loader)
    for step in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:
            dataset.epoch += 1
            batches = iter(loader)
            x, y = next(batches)
        x = x.to(device) if torch.is_tensor(x) else [t.to(device) for t in x]  # --tune-stages: (trunk, pooled)
        loss = loss_fn(model(x) if torch.is_tensor(x) else model(*x), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = 0.98 * smoothed + 0.02 * loss.item()
        value = smoothed / (1 - 0.98 ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        best = min(best, value)
        if not math.isfinite(value) or value > 4 * best:
            break
    return lrs, losses, suggest(lrs, losses)


def lr_find(plan, batch_size: int, steps: int = 100):
    """The range test for a planned task (``trainer.run.plan_tasks``): (rates, losses, suggestion, spec)."""
    from trainer.dataset import TrainingSet, default_cache_dir
    from trainer.task import make_loss, model_spec, new_model

    spec = model_spec(plan)
    dataset = TrainingSet(plan.items, spec.task, spec, plan.crop, plan.cache_dir or default_cache_dir(), train=True,
                          seed=plan.fit.seed, pre=plan.preprocessing)
    model = new_model(plan, spec, 0)
    with tempfile.TemporaryDirectory(prefix="dermbatch-lr-find-") as scratch:  # --tune-stages' trunk cache
        if plan.tune_stages is not None:  # the --tune-stages recipe: its trainable part over its cached trunk
            model, dataset = _tuned(plan, spec, model, dataset, Path(scratch))
        lrs, losses, suggestion = lr_range_test(model, dataset, make_loss(plan, plan.items),
                                                batch_size, plan.fit.device, steps=steps, seed=plan.fit.seed)
        del dataset  # its memory-mapped trunk closes before the folder goes
    return lrs, losses, suggestion, spec


class _CachedViews(torch.utils.data.Dataset):
    """(trunk output, pooled statistics) of a random cached view of each image, and its label."""

    def __init__(self, trunk, stats, labels: list[int], seed: int):
        self.trunk, self.stats, self.labels = trunk, stats, labels
        self.rng, self.epoch = np.random.default_rng(seed), 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(self.rng.integers(self.trunk.shape[1]))
        return (torch.from_numpy(np.asarray(self.trunk[i, v], np.float32)), torch.from_numpy(self.stats[i, v])), \
            torch.tensor(self.labels[i])


def _tuned(plan, spec, model, dataset, scratch: Path):
    from trainer.tuned import TunedTop, cache_trunk, linear_probe

    trunk, stats, _ = cache_trunk(model, spec, dataset, plan.tune_stages, plan.jitter_views, plan.fit.seed,
                                  scratch / "trunk.npy", None, plan.fit.device, plan.fit.workers)
    top = TunedTop(model, plan.tune_stages, plan.lora_rank, plan.fit.seed, plan.tune_depthwise)
    labels = np.array([i.label for i in plan.items])
    linear_probe(top, trunk, stats, np.arange(len(labels)), labels, plan.fit.seed)
    return top, _CachedViews(trunk, stats, labels.tolist(), plan.fit.seed)


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The rate of steepest descent of the smoothed loss against log(lr), ignoring the noisy ends."""
    if len(lrs) < 5:
        return lrs[int(np.argmin(losses))] / 10
    lo, hi = len(lrs) // 10, max(len(lrs) // 10 + 2, len(lrs) - len(lrs) // 10)
    gradient = np.gradient(np.asarray(losses[lo:hi]), np.log10(lrs[lo:hi]))
    return float(lrs[lo + int(np.argmin(gradient))])


def plot(lrs: list[float], losses: list[float], suggestion: float, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
