"""``dermbatch train --nproc 2`` (torchrun, DistributedDataParallel over gloo): the same batches and the same loss
curve as one process, rank 0 alone writes, and a killed run resumes to the uninterrupted result."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dermbatch.bundle import CLASSES
from dermbatch.cli.main import main
from dermbatch.cli.train import without_nproc
from tests.conftest import HAM, real_images
from trainer.distributed import ShardedOrder


def _batches(size: int, global_batch: int, world: int, seed: int, weights=None) -> list[list[list[int]]]:
    """Per rank, the batches its DataLoader would make from its ShardedOrder."""
    out = []
    for rank in range(world):
        sampler = ShardedOrder(size, global_batch, torch.Generator().manual_seed(seed), weights)
        sampler.rank, sampler.world = rank, world  # as torchrun's rank r of W would see it
        indices = list(sampler)
        assert len(indices) == len(sampler)
        step = global_batch // world
        out.append([indices[i:i + step] for i in range(0, len(indices), step)])
    return out


@pytest.mark.parametrize("balanced", [False, True])
def test_ranks_share_each_global_batch_of_one_process(balanced):
    size, batch = 103, 8
    weights = np.random.default_rng(0).uniform(0.1, 1, size) if balanced else None
    (single,) = _batches(size, batch, 1, seed=7, weights=weights)
    assert len(single) == size // batch and all(len(b) == batch for b in single)  # the last partial batch dropped
    for world in (2, 4):
        ranks = _batches(size, batch, world, seed=7, weights=weights)
        assert all(len(r) == len(single) for r in ranks)  # every rank takes the same number of steps
        for step, expected in enumerate(single):
            assert sorted(sum((r[step] for r in ranks), [])) == sorted(expected)
    if not balanced:
        assert sorted(sum(single, [])) == sorted(set(sum(single, [])))  # a permutation: no image twice


def test_fewer_images_than_a_batch_still_give_every_rank_the_same_count():
    ranks = _batches(5, 8, 2, seed=1)
    assert [sum(map(len, r)) for r in ranks] == [2, 2]


def test_nproc_is_stripped_for_the_relaunch():
    assert without_nproc(["--task", "cls", "--nproc", "2", "--out", "b"]) == ["--task", "cls", "--out", "b"]
    assert without_nproc(["--nproc=4", "--out", "b"]) == ["--out", "b"]


def test_cached_head_recipes_refuse_several_processes(tmp_path, capsys):
    for recipe in (["--frozen-backbone"], ["--tune-stages", "4"]):
        assert main(["train", "--task", "cls", "--images", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
                     "--out", str(tmp_path / "b"), "--nproc", "2", *recipe]) == 2
        assert "drop --nproc" in capsys.readouterr().err
    assert main(["train", "--task", "cls", "--images", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
                 "--out", str(tmp_path / "b"), "--nproc", "2", "--batch-size", "9"]) == 2
    assert "multiple of the 2 processes" in capsys.readouterr().err


# ---- real trainings on a tiny HAM10000 subset ------------------------------------------------------------------
# convnext_atto normalises with LayerNorm (per image), so 1 and 2 processes see the same arithmetic up to the order
# of float sums; a batch-norm model differs by its per-rank batch statistics (README: "Training on several
# processes").

TOLERANCE = 1e-4  # relative, on each epoch's train and validation loss


def _command(out: Path, cache: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "dermbatch", "train", "--task", "cls", "--images", str(HAM / "images"),
            "--labels", str(HAM / "labels.csv"), "--masks", str(HAM / "masks"), "--limit", "64", "--folds", "2",
            "--input-size", "64", "--batch-size", "8", "--workers", "0", "--class-weights", "ones",
            "--encoder", "convnext_atto", "--pretrained", "none", "--cache", str(cache), "--out", str(out), "-q",
            *map(str, extra)]


def _curve(out: Path) -> dict[tuple[int, int], dict]:
    """(fold, epoch) -> that epoch's log row (the last one, should a resumed run have logged it twice)."""
    rows = {}
    for fold in (0, 1):
        for row in csv.DictReader(open(out / "logs" / f"cls_fold{fold}.csv")):
            rows[fold, int(row["epoch"])] = row
    return rows


def _assert_same_curve(a: Path, b: Path) -> None:
    ca, cb = _curve(a), _curve(b)
    assert ca.keys() == cb.keys() and len(ca) == 6
    for key in ca:
        for column in ("train_loss", "val_loss"):
            x, y = float(ca[key][column]), float(cb[key][column])
            assert abs(x - y) <= TOLERANCE * abs(x), (key, column, x, y)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    real_images(HAM, 1)
    root = tmp_path_factory.mktemp("ddp")
    subprocess.run(_command(root / "one", root / "cache", "--epochs", "3"), check=True, capture_output=True,
                   timeout=600)
    return root


@pytest.mark.realdata
@pytest.mark.slow
def test_two_processes_train_the_same_curve_as_one(one_process):
    out = one_process / "two"
    done = subprocess.run(_command(out, one_process / "cache", "--epochs", "3", "--nproc", "2"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [str(out)]  # rank 0 alone prints (and writes)
    _assert_same_curve(one_process / "one", out)
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["classification"]["folds"] == [0, 1]
    assert manifest["provenance"]["classification"]["processes"] == 2
    assert all(len(list(csv.DictReader(open(out / "logs" / f"cls_fold{f}.csv")))) == 3 for f in (0, 1))
    for fold in (0, 1):  # the out-of-fold predictions of the two bundles agree
        one, two = (list(csv.DictReader(open(d / "oof" / f"cls_fold{fold}.csv"))) for d in (one_process / "one", out))
        assert [r["image"] for r in one] == [r["image"] for r in two]
        assert max(abs(float(a[c]) - float(b[c])) for a, b in zip(one, two, strict=True) for c in CLASSES) < 1e-3


@pytest.mark.realdata
@pytest.mark.slow
def test_a_killed_distributed_training_resumes_to_the_same_curve(one_process):
    out = one_process / "killed"
    command = _command(out, one_process / "cache", "--epochs", "3", "--nproc", "2")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    checkpoint = out / "checkpoints" / "cls_fold0.pt"
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():  # fold 0 has finished an epoch
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and both ranks
        proc.wait(timeout=60)
    assert not (out / "oof" / "cls_fold1.csv").exists(), "the run ended before it was killed"
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_curve(one_process / "one", out)
