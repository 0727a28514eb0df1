"""``dermbatch train`` under ``torchrun``: DistributedDataParallel over the processes torchrun starts.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; ``setup`` joins the process group (gloo on CPU, nccl on
CUDA, one GPU per process). Every rank builds the same folds and the same seeded model; DDP averages the
gradients. Rank 0 alone validates, writes checkpoints, logs, out-of-fold predictions and the bundle; the others
receive its decisions (``broadcast``) and wait for it at each fold's end (``barrier``).

The batches: ``ShardedOrder`` draws the epoch's global order of images from the (seed, fold, epoch) generator,
exactly as one process does, and gives rank r the items r, r+W, r+2W, ... of it (DistributedSampler's
sharding of that order). With a per-rank batch of ``--batch-size`` / W, the W ranks' step-k batches together are
the one-process run's step-k batch, so N processes train on the same images in the same steps as one; what
differs is batch-norm statistics (computed per rank: SyncBatchNorm needs a GPU) and the order of float sums.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from dermbatch.errors import UsageError

TIMEOUT = datetime.timedelta(hours=2)  # rank 0's out-of-fold predictions and bundle writes take minutes on a CPU


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> str:
    """Join torchrun's process group; return this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(*values: float) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)  # gloo and nccl both reduce float64 sums; the count of ranks is small
    return tensor.tolist()


def main_first(fn):
    """``fn()`` on rank 0, then on the others (which then find rank 0's files: splits, caches, predicted masks)."""
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def check_options(processes: int, batch_size: int, frozen_backbone: bool, tune_stages: int | None) -> None:
    """What several processes cannot train: the cached-head recipes, a global batch they cannot share evenly."""
    if processes <= 1:
        return
    if frozen_backbone or tune_stages is not None:
        raise UsageError("--frozen-backbone and --tune-stages fit a small head on cached features in one "
                         "process: drop --nproc (and torchrun)")
    if batch_size % processes:
        raise UsageError(f"--batch-size {batch_size} is the global batch: make it a multiple of the "
                         f"{processes} processes")


def per_rank_batch(batch_size: int) -> int:
    check_options(world(), batch_size, False, None)
    return batch_size // world()


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model DDP-wrapped when training distributed (gradients averaged over ranks), else itself."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


class ShardedOrder(Sampler[int]):
    """This rank's share of the epoch's global order: a seeded permutation, or a class-balanced draw with
    replacement (``weights``), cut to whole global batches, then every W-th item from this rank's offset."""

    def __init__(self, size: int, global_batch: int, generator: torch.Generator,
                 weights: np.ndarray | None = None, drop_last: bool = True):
        self.size, self.global_batch, self.generator, self.weights = size, global_batch, generator, weights
        self.drop_last = drop_last and size > global_batch
        self.rank, self.world = rank(), world()

    def _global(self) -> list[int]:
        if self.weights is not None:
            return torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), self.size, True,
                                     generator=self.generator).tolist()
        return torch.randperm(self.size, generator=self.generator).tolist()

    def __iter__(self):
        order = self._global()
        return iter(order[:self._kept()][self.rank::self.world])

    def _kept(self) -> int:
        """Whole global batches (or, with fewer images than one, a multiple of W: every rank the same count)."""
        return self.size - self.size % (self.global_batch if self.drop_last else self.world)

    def __len__(self) -> int:
        return self._kept() // self.world
