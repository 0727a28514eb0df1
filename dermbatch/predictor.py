"""The predictor: construct with runtime knobs, load a bundle's folds once, predict over an iterator.

``Predictor.predict`` is a generator: it yields one ``Result`` per input image, in input order, with
bounded memory (one batch in flight plus the decode queue).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np

from dermbatch.backends import create_backend
from dermbatch.bundle import Bundle, ModelSpec, load_bundle
from dermbatch.errors import UsageError
from dermbatch.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, decode_image
from dermbatch.inputs import InputImage, discover_inputs
from dermbatch.loader import Sample, batched, iter_samples
from dermbatch.manifest import TTA_MODES
from dermbatch.postprocess import mask_from_logits, scale_box
from dermbatch.preprocess import correct_colors, lesion_crop, model_input, scaled_crop
from dermbatch.quality import mask_features
from dermbatch.result import Result
from dermbatch.tta import classify_with_tta, segment_with_tta, softmax, views

log = logging.getLogger(__name__)


def segment_images(model_fn, spec: ModelSpec, images: list[np.ndarray], tta: str) -> list[np.ndarray]:
    """Clean masks (uint8 0/1, each at its image's size) for RGB images, made exactly as ``run`` makes them.

    ``model_fn`` maps a (B, 3, H, W) batch to stacked fold logits (F, B, 1, H, W), like ``Backend.segment``.
    """
    logits = segment_with_tta(model_fn, np.stack([model_input(rgb, spec) for rgb in images]), tta)
    return [mask_from_logits(logit[0], rgb.shape[:2], spec.threshold) for rgb, logit in zip(images, logits,
                                                                                             strict=True)]


def parse_folds(folds: str | Iterable[int] | None, bundle: Bundle) -> dict[str, tuple[int, ...]]:
    """``all``/None -> every fold present; "0,2" or [0, 2] -> those, checked against each task."""
    selected: dict[str, tuple[int, ...]] = {}
    if isinstance(folds, str) and folds.strip().lower() != "all":
        try:
            wanted = tuple(int(f) for f in folds.split(",") if f.strip())
        except ValueError:
            raise UsageError(f"--folds {folds!r}: use 'all' or comma-separated fold numbers like 0,2") from None
    else:
        wanted = None if folds is None or isinstance(folds, str) else tuple(folds)
    for task in ("segmentation", "classification"):
        present = bundle.spec(task).folds
        chosen = present if wanted is None else wanted
        missing = sorted(set(chosen) - set(present))
        if missing or not chosen:
            raise UsageError(f"--folds {folds}: {task} has folds {','.join(map(str, present))}, "
                             f"not {','.join(map(str, missing)) or 'none'}")
        selected[task] = tuple(chosen)
    return selected


def parse_crop_scales(scales: Iterable[float] | str) -> tuple[float, ...]:
    """``--crop-scales``: '0.85,1,1.2' or numbers, each the side of a classifier crop relative to the bundle's
    own crop around the same lesion; the logits are averaged over them (multi-scale test-time augmentation)."""
    try:
        values = tuple(float(v) for v in (scales.split(",") if isinstance(scales, str) else scales))
    except ValueError:
        raise UsageError(f"--crop-scales {scales!r}: give numbers separated by commas, e.g. 0.85,1,1.2") from None
    if not values or len(set(values)) != len(values) or not all(0 < v <= 3 for v in values):
        raise UsageError(f"--crop-scales {scales!r}: give distinct scales in (0, 3], e.g. 0.85,1,1.2")
    return values


def crop_specs(bundle: Bundle, scales: Iterable[float] | str) -> list:
    """The classifier crop of each ``--crop-scales`` scale (a scale too small for the bundle's margin refused)."""
    return [scaled_crop(bundle.crop, s) for s in parse_crop_scales(scales)]


def _non_finite(result: Result, output: np.ndarray) -> bool:
    """Mark ``result`` failed when a model output for it holds NaN or infinity (a broken engine or weights):
    such an image gets an error row, never a ``nan`` in the results CSV."""
    if np.isfinite(output).all():
        return False
    result.error = "model produced non-finite output (NaN or infinity); check the engine or rebuild it"
    result.image = result.mask = result.crop = None
    return True


class Predictor:
    def __init__(self, model: str | os.PathLike | None = None, *, backend: str = "auto", device: str = "auto",
                 tta: str | None = None, folds: str | Iterable[int] | None = "all", batch_size: int = 8,
                 workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True,
                 precision: str | None = None, first_use=None, crop_scales: Iterable[float] = (1.0,),
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if workers < 0:
            raise UsageError("--workers must be 0 (decode in the main thread) or more")
        if max_bytes < 0:
            raise UsageError("--max-file-size must be 0 (no limit) or more")
        self.bundle = load_bundle(model)
        self.seg_spec = self.bundle.spec("segmentation")
        self.cls_spec = self.bundle.spec("classification")
        self.tta = {"segmentation": tta or self.seg_spec.tta, "classification": tta or self.cls_spec.tta}
        for mode in self.tta.values():
            if mode not in TTA_MODES:
                raise UsageError(f"--tta {mode!r}: choose none, flip or d4")
        for spec in (self.seg_spec, self.cls_spec):
            if self.tta[spec.task] == "d4" and spec.input_size[0] != spec.input_size[1]:
                raise UsageError(f"--tta d4 needs a square {spec.task} input, not {spec.input_size}; use flip")
        self.folds = parse_folds(folds, self.bundle)
        self.crop_scales = parse_crop_scales(crop_scales)
        self.crop_specs = crop_specs(self.bundle, crop_scales)
        self.batch_size, self.workers, self.max_pixels, self.max_bytes = batch_size, workers, max_pixels, max_bytes
        # JPEGs are decoded at reduced scale only while the shorter side keeps 4x the classifier's input,
        # so a lesion covering a quarter of the image still reaches the classifier at full resolution.
        self.min_side = 4 * max(self.cls_spec.input_size) if reduced_decode else None
        # first_use: the hook that may build an engine for the installed default bundle (see backends.create_backend)
        self.backend = create_backend(backend, self.bundle, device, self.folds, first_use, precision=precision)
        self.seconds: dict[str, float] = defaultdict(float)
        log.info("bundle %s: folds seg %s, cls %s; TTA seg %s (%d views), cls %s (%d views)%s", self.bundle.name,
                 self.folds["segmentation"], self.folds["classification"], self.tta["segmentation"],
                 len(views(self.tta["segmentation"])), self.tta["classification"],
                 len(views(self.tta["classification"])) * len(self.crop_scales),
                 f" at crop scales {', '.join(f'{s:g}' for s in self.crop_scales)}" if self.crop_scales != (1.0,)
                 else "")

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def describe(self) -> dict:
        return {**self.backend.describe(), "tta": self.tta, "crop_scales": list(self.crop_scales),
                "folds": self.folds, "batch_size": self.batch_size, "workers": self.workers}

    def decode(self, path: str | os.PathLike, full_size: bool = False) -> DecodedImage:
        """The image as the models see it: decoded (a large JPEG at reduced size unless ``full_size``), with
        the bundle's colour correction."""
        decoded = decode_image(path, min_side=None if full_size else self.min_side, max_pixels=self.max_pixels,
                               max_bytes=self.max_bytes)
        decoded.rgb = correct_colors(decoded.rgb, self.bundle.preprocessing)  # what the models were trained on
        return decoded

    def _decode(self, item: InputImage) -> tuple[DecodedImage, np.ndarray]:
        decoded = self.decode(item.path)
        return decoded, model_input(decoded.rgb, self.seg_spec)

    def predict(self, inputs: str | os.PathLike | Iterable[str | os.PathLike] | Iterable[InputImage],
                recursive: bool = True) -> Iterator[Result]:
        """Yield one Result per image, in input order.

        ``inputs``: a path, a list of files and folders (expanded like the CLI does), or InputImage items.
        """
        items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not all(isinstance(i, InputImage) for i in items):
            items = discover_inputs(items, recursive=recursive)
        samples = iter_samples(items, self._decode, self.workers, depth=self.batch_size * 2 + self.workers)
        for batch in batched(samples, self.batch_size):
            yield from self.predict_batch(batch)

    def predict_batch(self, batch: list[Sample]) -> list[Result]:
        results = [Result(s.item.image_id, s.item.path, self.bundle.classes, error=s.error) for s in batch]
        self.seconds["decode"] += sum(s.seconds for s in batch)
        good = [(r, s) for r, s in zip(results, batch, strict=False) if s.error is None]
        if not good:
            return results
        start = time.perf_counter()
        x = np.stack([s.seg_input for _, s in good])
        logits = segment_with_tta(self.backend.segment, x, self.tta["segmentation"])
        done = []
        for (result, sample), seg_logits in zip(good, logits, strict=True):
            if _non_finite(result, seg_logits):
                continue
            self._finish_mask(result, sample.decoded, seg_logits[0])
            done.append(result)
        mid = time.perf_counter()
        if done:
            cls_logits = np.mean([classify_with_tta(self.backend.classify, self._crops(done, crop),
                                                    self.tta["classification"]) for crop in self.crop_specs], axis=0)
            for result, probs in zip(done, softmax(cls_logits.astype(np.float64)), strict=True):
                if not _non_finite(result, probs):
                    result.probabilities = probs
        self.seconds["segment"] += mid - start
        self.seconds["classify"] += time.perf_counter() - mid
        return results

    def _crops(self, results: list[Result], crop) -> np.ndarray:
        """The classifier's inputs: each result's own crop at the bundle's scale, else cut again at ``crop``'s
        margin around the same mask (the whole image where no lesion was found, at every scale)."""
        return np.stack([model_input(r.crop if crop == self.bundle.crop else lesion_crop(r.image, r.mask, crop)[0],
                                     self.cls_spec) for r in results])

    def _finish_mask(self, result: Result, decoded: DecodedImage, seg_logits: np.ndarray) -> None:
        rgb = decoded.rgb
        mask = mask_from_logits(seg_logits, rgb.shape[:2], self.seg_spec.threshold)
        quality = self.bundle.quality
        if quality is not None and mask.any():
            probs = quality.probabilities(mask_features(seg_logits, self.seg_spec.threshold))
            result.lesion_probability = float(probs["lesion"][0])
            result.mask_quality = float(probs["reliable"][0])
            if result.lesion_probability < quality.thresholds["lesion"]:  # no lesion: classify the whole image
                mask = np.zeros_like(mask)
        crop, box = lesion_crop(rgb, mask, self.bundle.crop)
        result.image, result.mask, result.crop, result.crop_box = rgb, mask, crop, box
        result.original_size = decoded.original_size
        result.lesion_found = box is not None
        result.area_fraction = float(mask.mean())
        if box is not None:
            result.bbox = scale_box(box, rgb.shape[:2], decoded.original_size)
