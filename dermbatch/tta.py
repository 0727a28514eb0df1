"""Test-time augmentation as small pure functions over a model callable.

A view is (k, flip): flip the width axis if ``flip``, then rotate by k*90 degrees. ``flip`` mode uses the
four views id, h, v, hv; ``d4`` all eight dihedral views. All views of a batch go through the model in one
call; mask logits are mapped back with the inverse view, and everything is averaged in logit space.

``model_fn`` takes a (B, C, H, W) float32 array and returns the stacked fold outputs, (F, B, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

View = tuple[int, bool]
ModelFn = Callable[[np.ndarray], np.ndarray]

VIEWS: dict[str, tuple[View, ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True), (2, True), (2, False)),  # id, h, v (= h then 180), hv (= 180)
    "d4": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def views(mode: str) -> tuple[View, ...]:
    try:
        return VIEWS[mode]
    except KeyError:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {', '.join(VIEWS)}") from None


def apply_view(x: np.ndarray, view: View) -> np.ndarray:
    """Transform the last two axes (H, W) of ``x``."""
    k, flip = view
    if flip:
        x = x[..., ::-1]
    return np.rot90(x, k, axes=(-2, -1))


def invert_view(y: np.ndarray, view: View) -> np.ndarray:
    k, flip = view
    y = np.rot90(y, -k, axes=(-2, -1))
    return y[..., ::-1] if flip else y


def stack_views(x: np.ndarray, mode: str) -> tuple[tuple[View, ...], np.ndarray]:
    vs = views(mode)
    batch = np.concatenate([apply_view(x, v) for v in vs]) if len(vs) > 1 else x
    return vs, np.ascontiguousarray(batch, dtype=np.float32)


def segment_with_tta(model_fn: ModelFn, x: np.ndarray, mode: str) -> np.ndarray:
    """(N, C, H, W) -> (N, 1, H, W): logits averaged over folds and views, each view inverted first."""
    vs, batch = stack_views(x, mode)
    out = np.asarray(model_fn(batch), dtype=np.float32)  # (F, V*N, 1, H, W)
    n = x.shape[0]
    total = np.zeros(out.shape[:1] + (n,) + out.shape[2:], np.float32)
    for i, view in enumerate(vs):
        total += invert_view(out[:, i * n:(i + 1) * n], view)
    return total.mean(axis=0) / len(vs)


def classify_with_tta(model_fn: ModelFn, x: np.ndarray, mode: str) -> np.ndarray:
    """(N, C, H, W) -> (N, K): class logits averaged over folds and views."""
    vs, batch = stack_views(x, mode)
    out = np.asarray(model_fn(batch), dtype=np.float32)  # (F, V*N, K)
    n = x.shape[0]
    return out.reshape(out.shape[0], len(vs), n, -1).mean(axis=(0, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
