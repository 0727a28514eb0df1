"""Training speed of the classifier on real HAM10000 crops: images/s of forward + backward + optimiser step for
each speed-up, side by side in one run.

1. ``full``: fine-tuning the whole EfficientNet-Lite0, ``dermbatch train``'s default path (decode-once cache,
   per-image augmentation in DataLoader workers);
2. ``full, channels_last``: the same with channels-last tensors;
3. ``frozen stem..stage K-1``: no gradient through the frozen part, but it still runs every step;
4. ``cached trunk`` (``--tune-stages K``): the frozen part's output read from the cache; only stages K..
   run, with rank-R updates (the step ``dermbatch train --tune-stages`` takes);
plus the one-off cost of filling that cache (images/s, 8 + J views each).

    python -m benchmarks.bench_train --images 256 --input-size 128 --steps 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA, report
from dermbatch.bundle import CropSpec, ModelSpec
from trainer.data import cls_items
from trainer.dataset import TrainingSet
from trainer.fit import FitConfig, _loader
from trainer.losses import ClassificationLoss
from trainer.pretrained import load_pretrained
from trainer.tuned import D4_VIEWS, TunedTop, training_views


def _timed(step, batches: int, batch_size: int) -> float:
    step()  # warm-up: first-call allocations
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--stage", type=int, default=4, help="first tuned stage (--tune-stages)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--jitter-views", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ham = DATA / "ham10000"
    items = cls_items(ham / "images", ham / "labels.csv", ham / "masks")[:: max(1, 8511 // args.images)][:args.images]
    encoder = "tf_efficientnet_lite0"
    size = (args.input_size, args.input_size)
    cache = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    loss_fn = ClassificationLoss(torch.ones(7), 0.0, 0.0)
    from dermbatch.models import build_model

    def model(architecture: str):
        spec = ModelSpec("classification", architecture, encoder, size, (0.5,) * 3, (0.5,) * 3, (0,))
        m = build_model(spec, 7)
        load_pretrained(m, "classification", encoder, "imagenet")
        return spec, m

    spec, full = model("timm")
    data = TrainingSet(items, "classification", spec, CropSpec(), cache, True, 0)
    for i in range(len(data)):
        data.arrays(i)  # the decode cache every variant reads (as a second training epoch would)
    cfg = FitConfig(batch_size=args.batch_size, workers=2)
    batches = iter(_loader(data, cfg, True, 0, 0))
    fixed = next(batches)

    def full_step(model_, x, y, channels_last=False):
        opt = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], 1e-4)

        def step():
            nonlocal x, y
            try:
                x, y = next(batches)
            except StopIteration:
                pass
            xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            loss = loss_fn(model_(xx), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    full.train()
    base = _timed(full_step(full, *fixed), args.steps, args.batch_size)
    rows.append({"variant": "full fine-tuning (default)", "images_per_s": base, "vs_full": 1.0})
    full = full.to(memory_format=torch.channels_last)
    batches = iter(_loader(data, cfg, True, 1, 0))
    speed = _timed(full_step(full, *fixed, channels_last=True), args.steps, args.batch_size)
    rows.append({"variant": "full, channels_last", "images_per_s": speed, "vs_full": speed / base})

    spec_ms, multistage = model("timm-multistage")
    for name, p in multistage.named_parameters():
        p.requires_grad = not any(name.startswith(f"backbone.{k}") for k in
                                  ("conv_stem", "bn1", *(f"blocks.{i}." for i in range(args.stage))))
    multistage.train()
    for module in [multistage.backbone.conv_stem, multistage.backbone.bn1, *multistage.backbone.blocks[:args.stage]]:
        module.eval()
    batches = iter(_loader(data, cfg, True, 2, 0))
    speed = _timed(full_step(multistage, *fixed), args.steps, args.batch_size)
    rows.append({"variant": f"frozen stem..stage {args.stage - 1} (run every step)", "images_per_s": speed,
                 "vs_full": speed / base})

    _, trunk_model = model("timm-multistage")
    trunk_model.eval()
    start = time.perf_counter()
    outs, pooled = [], []
    with torch.no_grad():
        for i in range(len(items)):
            x = torch.from_numpy(training_views(data.arrays(i), spec_ms, args.jitter_views, np.random.default_rng(i)))
            out, stats = trunk_model.trunk(x, args.stage)
            outs.append(out.half())
            pooled.append(stats)
    fill = len(items) / (time.perf_counter() - start)
    trunk, stats = torch.stack(outs), torch.stack(pooled)
    top = TunedTop(trunk_model, args.stage, args.rank, 0)
    opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], 1e-4)
    labels = torch.tensor([i.label for i in items])
    generator = torch.Generator().manual_seed(0)

    def cached_step():
        idx = torch.randint(0, len(items), (args.batch_size,), generator=generator)
        view = torch.randint(0, D4_VIEWS + args.jitter_views, (args.batch_size,), generator=generator)
        loss = loss_fn(top(trunk[idx, view].float(), stats[idx, view]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    speed = _timed(cached_step, args.steps * 4, args.batch_size)
    rows.append({"variant": f"cached trunk, stages {args.stage}.. tuned, rank {args.rank} (--tune-stages)",
                 "images_per_s": speed, "vs_full": speed / base})
    report("classifier training speed (forward + backward + step)", rows,
           {"cache fill (once), images/s": f"{fill:.1f} ({D4_VIEWS + args.jitter_views} views each)",
            "input": f"{args.input_size} px, batch {args.batch_size}, {len(items)} HAM10000 crops, "
                     f"{torch.get_num_threads()} threads"}, args.json)


if __name__ == "__main__":
    main()
