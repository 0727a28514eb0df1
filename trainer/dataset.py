"""Datasets over a decode-once cache.

Each image is decoded and resized once with the pipeline's own functions (``dermbatch.imageio``,
``dermbatch.preprocess``) and stored as ``.npz`` under ``<cache>/<task>-<settings hash>/<content hash>.npz``,
keyed by the bytes of the image and mask and by the sizes and crop settings, so a changed file or setting
never reuses a stale entry. For the classifier two views are cached: the exact crop ``dermbatch run`` would
make (used for validation and out-of-fold predictions) and a looser crop that training jitters inside.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dermbatch.bundle import CropSpec, ModelSpec, PreprocessSpec
from dermbatch.imageio import decode_image
from dermbatch.preprocess import correct_colors, lesion_crop, normalize, resize_rgb
from trainer.augment import geometric, jitter_crop, photometric
from trainer.data import Item

LOOSE_EXTRA_MARGIN = 0.2  # the loose crop's margin beyond the bundle's, room for jitter


def default_cache_dir() -> Path:
    return Path(os.environ.get("DERMBATCH_CACHE", Path.home() / ".cache" / "dermbatch")) / "train"


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: unreadable mask")
    if mask.shape != size:
        mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def prepare_seg(item: Item, spec: ModelSpec, pre: PreprocessSpec) -> dict[str, np.ndarray]:
    rgb = correct_colors(decode_image(item.image).rgb, pre)
    mask = read_mask(item.mask, rgb.shape[:2])
    height, width = spec.input_size
    return {"image": resize_rgb(rgb, spec.input_size),
            "mask": cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)}


def prepare_cls(item: Item, spec: ModelSpec, crop: CropSpec, pre: PreprocessSpec) -> dict[str, np.ndarray]:
    rgb = correct_colors(decode_image(item.image, min_side=4 * max(spec.input_size)).rgb, pre)
    mask = read_mask(item.mask, rgb.shape[:2]) if item.mask is not None else None
    exact, _ = lesion_crop(rgb, mask, crop)
    loose_spec = CropSpec(margin=crop.margin + LOOSE_EXTRA_MARGIN, square=crop.square, background=crop.background)
    loose, box = lesion_crop(rgb, mask, loose_spec)
    loose_size = tuple(int(round(s * 1.3)) for s in spec.input_size)
    inner = (1 + 2 * crop.margin) / (1 + 2 * loose_spec.margin) if box is not None else 1.0
    return {"crop": resize_rgb(exact, spec.input_size), "loose": resize_rgb(loose, loose_size),
            "inner": np.float32(inner)}


class Cache:
    def __init__(self, root: Path, task: str, settings: dict):
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.dir = Path(root) / f"{task}-{digest}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def key(self, item: Item) -> str:
        h = hashlib.sha1(item.image.read_bytes())
        if item.mask is not None:
            h.update(item.mask.read_bytes())
        return h.hexdigest()

    def get(self, item: Item, prepare) -> dict[str, np.ndarray]:
        path = self.dir / f"{self.key(item)}.npz"
        if path.exists():
            with np.load(path) as data:
                return dict(data)
        arrays = prepare(item)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return arrays


class TrainingSet(Dataset):
    """Items of one task; ``train=True`` augments with generators seeded by (seed, epoch, index)."""

    def __init__(self, items: list[Item], task: str, spec: ModelSpec, crop: CropSpec, cache_root: Path,
                 train: bool, seed: int = 0, pre: PreprocessSpec = PreprocessSpec()):
        self.items, self.task, self.spec, self.crop, self.train, self.seed = items, task, spec, crop, train, seed
        self.pre = pre
        settings = {"spec": asdict(spec) | {"folds": None, "tta": None}, "crop": asdict(crop), "pre": asdict(pre)}
        self.cache = Cache(cache_root, task, settings)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        item = self.items[index]
        if self.task == "segmentation":
            return self.cache.get(item, lambda i: prepare_seg(i, self.spec, self.pre))
        return self.cache.get(item, lambda i: prepare_cls(i, self.spec, self.crop, self.pre))

    def __getitem__(self, index: int):
        arrays = self.arrays(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.task == "segmentation":
            image, mask = arrays["image"], arrays["mask"]
            if self.train:
                image, mask = geometric(rng, image, mask)
                image = photometric(rng, image)
            return torch.from_numpy(normalize(image, self.spec)), torch.from_numpy(mask[None].astype(np.float32))
        if self.train:
            image = resize_rgb(jitter_crop(rng, arrays["loose"], float(arrays["inner"])), self.spec.input_size)
            image = photometric(rng, geometric(rng, image)[0])
        else:
            image = arrays["crop"]
        return torch.from_numpy(normalize(image, self.spec)), torch.tensor(self.items[index].label)
