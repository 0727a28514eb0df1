"""``dermbatch pack``: copy a trained bundle for distribution, optionally with fp16 weight storage.

fp16 storage halves the size (the installed default bundle must fit in git); weights are read back as
float32, so inference is unchanged apart from the rounding, which is measured: the packed bundle and the
original run on the same images and the largest probability difference must stay within ``tolerance``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from dermbatch.bundle import TASKS, load_bundle, save_weights, write_manifest
from dermbatch.errors import UsageError
from dermbatch.models import LOW_RANK as LOW_RANK_KEYS
from dermbatch.predictor import Predictor
from trainer.card import write_model_card

log = logging.getLogger(__name__)
COPIED = ("metrics.json", "splits.json", "logs")


LOW_RANK = "low-rank"  # --half lora: only the fine-tuned folds' low-rank factors (``*.lora_a``, ``*.lora_b``)


def parse_half(value: str) -> tuple[str, ...]:
    """``--half``: "seg,cls", "seg", "cls", "lora" (the low-rank updates of ``--tune-stages`` folds only) or
    "none", comma-separated -> what is stored as float16 (task names, or ``LOW_RANK``)."""
    names = {"seg": "segmentation", "cls": "classification", "lora": LOW_RANK}
    parts = [p.strip() for p in value.split(",") if p.strip() and p.strip() != "none"]
    if any(p not in names for p in parts):
        raise UsageError(f"--half {value!r}: use seg, cls, lora, a comma-separated mix, or none")
    return tuple(names[p] for p in parts)


def _storage(task: str, half: tuple[str, ...], low_rank: bool) -> str:
    if task in half:
        return "float16"
    return "float32, low-rank updates float16" if low_rank and LOW_RANK in half else "float32"


def pack_bundle(src: Path, dst: Path, half: tuple[str, ...] = TASKS, check_images: Path | None = None,
                tolerance: float = 1e-3, name: str | None = None, note: str | None = None) -> dict:
    """Write ``dst`` from ``src`` with ``half`` tasks' weights in float16; return the check ({"images",
    "max_prob_diff", ...}) recorded in its manifest."""
    source = load_bundle(src)
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst} exists and is not empty; choose a new --out")
    dst.mkdir(parents=True, exist_ok=True)
    weights, low_rank = {}, dict.fromkeys(TASKS, False)
    for task in TASKS:
        shared = source.read_shared(task)
        if shared:  # stays stored once
            file, digest = save_weights(dst, task, None, shared, half=task in half)
            weights[file] = digest
        for fold in source.spec(task).folds:
            state = source.read_weights(task, fold, shared=False)
            if LOW_RANK in half:  # the factors of a fine-tuned fold's update: small next to the weights they change
                factors = {k for k in state if k.endswith(LOW_RANK_KEYS)}
                low_rank[task] |= bool(factors)
                state = {k: v.half() if k in factors else v for k, v in state.items()}
            file, digest = save_weights(dst, task, fold, state, half=task in half)
            weights[file] = digest
    for item in COPIED:
        if (source.path / item).is_dir():
            shutil.copytree(source.path / item, dst / item)
        elif (source.path / item).is_file():
            shutil.copy2(source.path / item, dst / item)
    manifest = json.loads(json.dumps(source.manifest))
    manifest["weights"] = dict(sorted(weights.items()))
    manifest["name"] = name or manifest.get("name") or dst.name
    packed = {"storage": {task: _storage(task, half, low_rank[task]) for task in TASKS}, "from": source.name}
    if note:
        packed["note"] = note
    manifest.setdefault("provenance", {})["packed"] = packed
    write_manifest(dst, manifest)
    if check_images is not None:
        packed.update(compare_bundles(source.path, dst, check_images))
        write_manifest(dst, manifest)
        if packed["max_prob_diff"] > tolerance:
            raise UsageError(f"{dst}: probabilities differ from {src} by up to {packed['max_prob_diff']:.2e} "
                             f"(> {tolerance}); store more in float32 (--half seg, --half none)")
    write_model_card(dst)
    log.info("packed %s into %s (%s weights): %s", src, dst, packed["storage"], packed)
    return packed


def compare_bundles(a: Path, b: Path, images: Path) -> dict:
    """Run both bundles the way ``dermbatch run`` does (torch, CPU, their TTA) on ``images``; compare."""
    outputs = []
    for bundle in (a, b):
        with Predictor(bundle, backend="torch", device="cpu", workers=0) as predictor:
            outputs.append([(r.image_id, r.probabilities, r.mask) for r in predictor.predict(images) if r.ok])
    probs = [np.stack([p for _, p, _ in out]) for out in outputs]
    masks = [[m for _, _, m in out] for out in outputs]
    changed = [float((x != y).mean()) for x, y in zip(*masks, strict=True)]
    return {"images": len(probs[0]), "max_prob_diff": float(np.abs(probs[0] - probs[1]).max()),
            "top1_agreement": float((probs[0].argmax(1) == probs[1].argmax(1)).mean()),
            "max_mask_pixels_changed": max(changed)}
