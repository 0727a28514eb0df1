"""k-fold splits: seeded, stratified by class, grouped by lesion; made once and saved as ``splits.json``.

``splits.json`` maps each task to ``{"folds": K, "seed": S, "fold_of": {image_id: fold}}``; ``--resume`` and
later training of the other task reuse it, so no lesion ever changes fold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dermbatch.errors import UsageError

SPLITS_FILE = "splits.json"


def make_splits(ids: Sequence[str], folds: int, seed: int, labels: Sequence[int] | None = None,
                groups: Sequence[str] | None = None) -> dict[str, int]:
    """Assign every image a fold in 0..folds-1; images of one group share a fold; classes are spread evenly."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if folds < 2:
        raise UsageError("--folds must be at least 2 (k-fold training needs a held-out fold)")
    groups = list(groups) if groups is not None else list(ids)
    if len(set(groups)) < folds:
        raise UsageError(f"{len(set(groups))} lesions/images cannot fill {folds} folds")
    index = np.arange(len(ids))
    if labels is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(index, labels, groups)
    else:
        rng = np.random.default_rng(seed)  # GroupKFold does not shuffle: permute the groups first
        names = sorted(set(groups))
        rank = dict(zip(names, rng.permutation(len(names)), strict=True))
        parts = GroupKFold(n_splits=folds).split(index, groups=[rank[g] for g in groups])
    fold_of: dict[str, int] = {}
    for fold, (_, held_out) in enumerate(parts):
        for i in held_out:
            fold_of[ids[i]] = fold
    return fold_of


def load_or_make(bundle_dir: Path, task: str, ids: Sequence[str], folds: int, seed: int,
                 labels: Sequence[int] | None = None, groups: Sequence[str] | None = None) -> dict[str, int]:
    """The saved split for ``task`` if it covers exactly these images, else a new one (saved)."""
    path = bundle_dir / SPLITS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    entry = saved.get(task)
    if entry is not None:
        if set(entry["fold_of"]) != set(ids) or entry["folds"] != folds:
            raise UsageError(f"{path}: the saved {task} split has {entry['folds']} folds over "
                             f"{len(entry['fold_of'])} images, this run {folds} folds over {len(ids)}; "
                             "use a new --out or the same data and --folds")
        return {k: int(v) for k, v in entry["fold_of"].items()}
    fold_of = make_splits(ids, folds, seed, labels, groups)
    saved[task] = {"folds": folds, "seed": seed, "grouped_by": "lesion_id" if groups is not None else "image",
                   "stratified": labels is not None, "fold_of": fold_of}
    bundle_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))
    return fold_of
