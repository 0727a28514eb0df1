"""The model bundle: a directory with ``bundle.json`` and safetensors weights per task and fold.

Layout::

    bundle.json                 manifest (see ``validate_manifest``)
    seg_fold0.safetensors ...   segmentation weights, one file per fold
    cls_fold0.safetensors ...   classification weights, one file per fold
    cls_shared.safetensors      optional: tensors every fold of the task shares (a frozen backbone),
                                stored once; each fold file then holds only its own tensors
    splits.json, metrics.json, README.md, engines/   optional, written by trainer/engines

Every weight file is listed in ``manifest["weights"]`` with its sha256; reading weights verifies it,
so a tampered or swapped file is refused. Weights are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dermbatch.errors import BundleError, UsageError
from dermbatch.jsonfile import read_json
from dermbatch.manifest import (
    CLASSES,
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST,
    TASK_PREFIX,
    TASKS,
    validate_manifest,
)
from dermbatch.quality import QualityModel
from dermbatch.screening import OperatingPoint, points_from_manifest

__all__ = ["CLASSES", "Bundle", "CropSpec", "ModelSpec", "load_bundle", "save_weights", "write_manifest"]

DEFAULT_BUNDLE_DIR = Path(__file__).parent / "bundles" / "default"


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and combine one task's fold models."""

    task: str
    architecture: str
    encoder: str
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    folds: tuple[int, ...]
    tta: str = "flip"
    threshold: float = 0.5  # segmentation only: probability threshold

    def weight_file(self, fold: int) -> str:
        return f"{TASK_PREFIX[self.task]}_fold{fold}.safetensors"

    @property
    def shared_file(self) -> str:
        return f"{TASK_PREFIX[self.task]}_shared.safetensors"


@dataclass(frozen=True)
class CropSpec:
    """How the classifier's input is cut from the full-resolution image around the lesion mask."""

    margin: float = 0.1  # fraction of the box size added on each side
    square: bool = True  # grow the shorter side so the lesion keeps its aspect ratio
    background: str = "keep"  # "mask": paint pixels outside the lesion with the mean colour


@dataclass(frozen=True)
class PreprocessSpec:
    """Optional photometric correction applied to every decoded image, in training and in ``run``."""

    color_constancy: str = "none"  # "shades_of_gray": Finlayson & Trezzi 2004, Minkowski norm p=6
    gamma: float = 1.0  # output = input ** (1 / gamma) on [0, 1]

    @property
    def active(self) -> bool:
        return self.color_constancy != "none" or self.gamma != 1.0


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    classes: tuple[str, ...]
    segmentation: ModelSpec | None
    classification: ModelSpec | None
    crop: CropSpec
    preprocessing: PreprocessSpec = PreprocessSpec()
    quality: QualityModel | None = None  # the segmentation's mask-quality models (``dermbatch.quality``)
    screening: tuple[OperatingPoint, ...] = ()  # the classifier's stored operating points (``dermbatch.screening``)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    @property
    def is_installed_default(self) -> bool:
        """The bundle shipped inside the package (its engines go to the per-user cache)."""
        return self.path.resolve() == DEFAULT_BUNDLE_DIR.resolve()

    def spec(self, task: str) -> ModelSpec:
        spec = getattr(self, task)
        if spec is None:
            raise BundleError(f"{self.path}: bundle has no {task} model; train it with "
                              f"`dermbatch train --task {TASK_PREFIX[task]}`")
        return spec

    def read_weights(self, task: str, fold: int, shared: bool = True) -> dict:
        """One fold's state dict (float32 tensors), each file's sha256 checked first; with ``shared``, merged
        with the task's shared tensors when the bundle has them."""
        spec = self.spec(task)
        state = self._read_verified(spec.weight_file(fold))
        common = self.read_shared(task) if shared else {}
        overlap = sorted(set(common) & set(state))
        if overlap:
            raise BundleError(f"{self.path / spec.weight_file(fold)}: {overlap[0]} is also in {spec.shared_file}; "
                              "a tensor must live in one of them")
        return common | state

    def read_shared(self, task: str) -> dict:
        """The tensors every fold of ``task`` shares ({} when the bundle stores whole models per fold)."""
        name = self.spec(task).shared_file
        return self._read_verified(name) if name in self.manifest["weights"] else {}

    def _read_verified(self, name: str) -> dict:
        from safetensors.torch import load as load_safetensors

        data = _read_file(self.path / name)
        expected = self.manifest["weights"].get(name)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise BundleError(f"{self.path / name}: sha256 {actual[:12]}… does not match bundle.json "
                              f"({str(expected)[:12]}…); the file was changed or replaced, refusing to load it")
        try:
            state = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{self.path / name}: not a valid safetensors file ({exc})") from None
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def hashes(self) -> dict[str, str]:
        return dict(self.manifest["weights"])


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: weight file listed in bundle.json is missing") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_bundle_path(model: str | os.PathLike | None) -> Path:
    """``--model`` if given, else ``$DERMBATCH_MODEL``, else the bundle installed with the package."""
    if model is not None:
        return Path(model)
    if os.environ.get("DERMBATCH_MODEL"):
        return Path(os.environ["DERMBATCH_MODEL"])
    if (DEFAULT_BUNDLE_DIR / MANIFEST).is_file():
        return DEFAULT_BUNDLE_DIR
    raise BundleError("no model bundle given and no default bundle installed; pass --model DIR "
                      "(a bundle made by `dermbatch train`) or set DERMBATCH_MODEL")


def load_bundle(path: str | os.PathLike | None = None) -> Bundle:
    """Read and validate a bundle's manifest; check that every weight file it lists is present."""
    root = resolve_bundle_path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise UsageError(f"{root}: model bundle directory not found")  # a mistyped --model: exit code 2
    try:
        manifest = read_json(manifest_path, BundleError, "manifest")
    except FileNotFoundError:
        raise BundleError(f"{root}: not a model bundle (no {MANIFEST})") from None
    bundle = parse_manifest(manifest, root)
    for name in manifest["weights"]:
        if not (root / name).is_file():
            raise BundleError(f"{root / name}: weight file listed in bundle.json is missing")
    return bundle


def parse_manifest(manifest: Any, root: Path) -> Bundle:
    validate_manifest(manifest, where=str(root / MANIFEST))
    specs = {task: _model_spec(task, manifest[task]) if manifest.get(task) else None for task in TASKS}
    crop = CropSpec(**manifest.get("crop", {}))
    try:
        quality = QualityModel.from_manifest((manifest.get("segmentation") or {}).get("quality"))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{root / MANIFEST}: segmentation.quality: {exc}") from None
    try:
        screening = points_from_manifest((manifest.get("classification") or {}).get("screening"))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{root / MANIFEST}: classification.screening: {exc}") from None
    return Bundle(Path(root), manifest, tuple(manifest["classes"]), specs["segmentation"],
                  specs["classification"], crop, PreprocessSpec(**manifest.get("preprocessing", {})), quality,
                  screening)


def _model_spec(task: str, section: dict) -> ModelSpec:
    return ModelSpec(task=task, architecture=section["architecture"], encoder=section["encoder"],
                     input_size=tuple(section["input_size"]), mean=tuple(section.get("mean", IMAGENET_MEAN)),
                     std=tuple(section.get("std", IMAGENET_STD)), folds=tuple(section["folds"]),
                     tta=section.get("tta", "flip"), threshold=float(section.get("threshold", 0.5)))


def save_weights(root: str | os.PathLike, task: str, fold: int | None, state_dict: dict,
                 half: bool = False) -> tuple[str, str]:
    """Write one fold's weights (``fold=None``: the task's shared tensors) as safetensors; return (file name,
    sha256) for the manifest."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{TASK_PREFIX[task]}_{'shared' if fold is None else f'fold{fold}'}.safetensors"
    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state_dict.items()}
    tmp = root / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, root / name)
    return name, sha256_file(root / name)


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    """Validate and atomically write ``bundle.json``."""
    root = Path(root)
    validate_manifest(manifest, where=str(root / MANIFEST))
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


def spec_to_dict(spec: ModelSpec) -> dict:
    section = {"architecture": spec.architecture, "encoder": spec.encoder, "input_size": list(spec.input_size),
               "mean": list(spec.mean), "std": list(spec.std), "folds": list(spec.folds), "tta": spec.tta}
    if spec.task == "segmentation":
        section["threshold"] = spec.threshold
    return section


def build_manifest(segmentation: ModelSpec | None, classification: ModelSpec | None, crop: CropSpec,
                   weights: dict[str, str], name: str, provenance: dict | None = None,
                   preprocessing: PreprocessSpec | None = None) -> dict:
    """The manifest dict for these specs (the inverse of ``parse_manifest``)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "classes": list(CLASSES),
        "segmentation": spec_to_dict(segmentation) if segmentation else None,
        "classification": spec_to_dict(classification) if classification else None,
        "crop": {"margin": crop.margin, "square": crop.square, "background": crop.background},
        "preprocessing": asdict(preprocessing or PreprocessSpec()),
        "weights": dict(sorted(weights.items())),
        "provenance": provenance or {},
    }
