"""What bundles are installed, and a short summary of one (``dermbatch models``, ``dermbatch info``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dermbatch.backends.store import engine_roots
from dermbatch.bundle import DEFAULT_BUNDLE_DIR, MANIFEST, Bundle, load_bundle


def installed_bundles(extra: list[Path] | None = None) -> list[tuple[str, Path]]:
    """(where it was found, path) for the packaged default, $DERMBATCH_MODEL, and folders under ``extra``."""
    found: list[tuple[str, Path]] = []
    if (DEFAULT_BUNDLE_DIR / MANIFEST).is_file():
        found.append(("installed default", DEFAULT_BUNDLE_DIR))
    if os.environ.get("DERMBATCH_MODEL"):
        found.append(("$DERMBATCH_MODEL", Path(os.environ["DERMBATCH_MODEL"])))
    for root in extra or []:
        candidates = [root] if (root / MANIFEST).is_file() else sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
        found.extend((str(root), path) for path in candidates)
    return found


def summary(bundle: Bundle) -> dict:
    """The facts a user checks before trusting a bundle: models, folds, data, OOF metrics, engines."""
    metrics_path = bundle.path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    out: dict = {"name": bundle.name, "path": str(bundle.path), "classes": list(bundle.classes)}
    for task in ("segmentation", "classification"):
        spec = getattr(bundle, task)
        if spec is None:
            out[task] = None
            continue
        prov = bundle.manifest.get("provenance", {}).get(task, {})
        entry = {"model": f"{spec.architecture} / {spec.encoder}", "input": list(spec.input_size),
                 "folds": list(spec.folds), "tta": spec.tta, "data": prov.get("data", "unknown")}
        m = metrics.get(task, {})
        keys = ("thresholded_jaccard", "jaccard", "dice") if task == "segmentation" else (
            "balanced_accuracy", "macro_auc", "accuracy")
        entry["oof_metrics"] = {k: m[k] for k in keys if k in m}
        report = (bundle.manifest[task].get("quality") or {}).get("report")
        if task == "segmentation" and report:
            entry["mask_quality"] = {"images": report["images"], "data": report["data"],
                                     "reliable_oof_auc": report["reliable"]["oof_auc"],
                                     "lesion_oof_auc": report["lesion"]["oof_auc"],
                                     "lesion_threshold": report["lesion"]["threshold"]}
        out[task] = entry
    out["crop"] = vars(bundle.crop)
    out["preprocessing"] = vars(bundle.preprocessing)
    roots = engine_roots(bundle)  # the bundle's own folder and the per-user cache
    out["engines"] = sorted({p.name for root in roots if root.is_dir() for p in root.iterdir()
                             if (p / "engine.json").exists()})
    out["model_card"] = str(bundle.path / "README.md") if (bundle.path / "README.md").exists() else None
    return out


def load_summary(path: str | os.PathLike | None) -> dict:
    return summary(load_bundle(path))
