"""The model card (``README.md`` inside a bundle), written from the manifest and the OOF metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dermbatch.bundle import CLASSES
from dermbatch.screening import OperatingPoint, points_from_manifest

WARNING = ("**Research use only. This is not a medical device**: it must not be used to diagnose, treat or "
           "triage patients. Trained on public dermoscopic images, most from fair-skinned patients; accuracy "
           "on other populations, cameras and clinics is unknown.")
LICENCE = ("Training data: HAM10000 (Tschandl et al., Sci. Data 5:180161, 2018) and ISIC 2018 Task 1 "
           "(Codella et al., arXiv:1902.03368), both CC BY-NC 4.0: these weights are for non-commercial research.")


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _command(argv: list[str]) -> str:
    """The training command line as typed: ``dermbatch …`` whatever path the script had."""
    return " ".join(["dermbatch", *argv[1:]]) if argv else "–"


def _quality_lines(quality: dict | None) -> list[str]:
    """The mask-quality paragraph (``dermbatch calibrate-masks``'s report), if the bundle has one."""
    report = (quality or {}).get("report")
    if not report:
        return []
    rel, les = report["reliable"], report["lesion"]
    return ["Mask quality (`mask_quality`, `lesion_probability` in the details CSV): logistic models on "
            f"segmentation statistics, fitted on {report['images']} images of {report['data']} (with expert masks, "
            f"not used to train the U-Net) and {report['skin_views']} lesion-free skin views cut from them, by "
            f"`{report['command']}`. Out of fold (lesion-grouped): P(Jaccard ≥ 0.65) AUC {rel['oof_auc']:.3f}, "
            f"Brier {rel['oof_brier']:.3f}, calibration error {rel['oof_calibration_error']:.3f}; lesion presence "
            f"AUC {les['oof_auc']:.3f}, at threshold {les['threshold']:.3f} {les['oof_missed_lesions']:.1%} of "
            f"lesions missed and {les['oof_skin_views_rejected']:.1%} of skin views rejected.", ""]


def _screening_lines(screening: dict | None) -> list[str]:
    """The stored operating points (``dermbatch run --screen``), if the bundle has them."""
    if not screening:
        return []
    return [f"Screening operating points (`dermbatch run --screen`), chosen on {screening.get('images', '–')} "
            f"out-of-fold images of {screening.get('lesions', '–')} lesions; 95 % intervals by lesion-grouped "
            "bootstrap:", "", *screening_table(points_from_manifest(screening)), ""]


def screening_table(points: Sequence[OperatingPoint]) -> list[str]:
    """The points as Markdown table rows (README, model card, the command's output)."""
    rows = ["| point | threshold | sensitivity [95 % CI] | specificity [95 % CI] |", "| --- | --- | --- | --- |"]
    for p in points:
        rows.append(f"| `{p.name}` | {p.threshold:.4f} | {p.sensitivity:.3f} [{p.sensitivity_ci[0]:.3f}, "
                    f"{p.sensitivity_ci[1]:.3f}] | {p.specificity:.3f} [{p.specificity_ci[0]:.3f}, "
                    f"{p.specificity_ci[1]:.3f}] |")
    return rows


def write_model_card(bundle_dir: Path) -> Path:
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    metrics_path = bundle_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    lines = [f"# {manifest.get('name', bundle_dir.name)}", "", WARNING, "", LICENCE, ""]
    for task in ("segmentation", "classification"):
        section = manifest.get(task)
        if not section:
            continue
        prov = manifest.get("provenance", {}).get(task, {})
        lines += [f"## {task.capitalize()}", "",
                  f"- model: {section['architecture']} / {section['encoder']}, input {section['input_size']}, "
                  f"folds {section['folds']}, TTA {section['tta']}",
                  f"- data: {prov.get('data', '–')} ({prov.get('images', '–')} images), "
                  f"initialisation: {prov.get('pretrained', '–')}",
                  f"- trained with: `{_command(prov.get('command', []))}`"]
        frozen = prov.get("frozen_backbone")
        if frozen:
            chosen = ", ".join(f"fold {k}: {c:g}" for k, c in sorted(frozen.get("chosen_c", {}).items()))
            lines.append(f"- training: backbone frozen at its {prov.get('pretrained', '–')} weights; per fold a "
                         "class-weighted logistic regression on its pooled features, L2 inverse strength C "
                         f"chosen by {frozen.get('inner_folds')}-fold grouped inner cross-validation "
                         f"from {frozen.get('c_grid')} ({chosen})")
        tuned = prov.get("tuned_stages")
        if tuned:
            lines.append(f"- training: stem and stages 0..{tuned['from_stage'] - 1} frozen at their "
                         f"{prov.get('pretrained', '–')} weights (output cached for {tuned['dihedral_views']} "
                         f"dihedral and {tuned['jitter_views']} jittered views per image); stages "
                         f"{tuned['from_stage']}.. fine-tuned per fold: "
                         + (f"rank-{tuned['lora_rank']} updates of their 1x1 convolutions and of the head "
                            "convolution, " if tuned["lora_rank"] else "")
                         + ("their depthwise kernels, " if tuned.get("depthwise") else "")
                         + "their batch-norm scales (statistics kept) and a classifier started from a linear "
                         f"probe (C={tuned['probe_c']:g}); the last epoch is kept (none chosen on held-out images)"
                         + (f"; {tuned['extra_training_images']} extra labelled images on the training side of "
                            "every fold only" if tuned.get("extra_training_images") else "")
                         + ("; logit adjustment logit / T - tau x log(class frequency), T (by log loss) and tau (by "
                            "balanced accuracy) per fold by an inner split of its training images: "
                            + ", ".join(f"fold {k}: T {tuned.get('temperature', {}).get(k, 1.0):g}, tau {t:g}"
                                        for k, t in sorted(tuned["prior_tau"].items()))
                            if tuned.get("prior_tau") else ""))
        lines.append("")
        m = metrics.get(task)
        if not m:
            continue
        lines += [f"Out-of-fold metrics (grouped by lesion, {m['images']} images, folds {m.get('folds')}):", ""]
        if task == "segmentation":
            lines += ["| thresholded Jaccard | Jaccard | Dice |", "| --- | --- | --- |",
                      f"| {_fmt(m['thresholded_jaccard'])} | {_fmt(m['jaccard'])} | {_fmt(m['dice'])} |", ""]
            lines += _quality_lines(section.get("quality"))
        else:
            lines += ["| balanced accuracy | macro AUC | accuracy | ECE |", "| --- | --- | --- | --- |",
                      f"| {_fmt(m['balanced_accuracy'])} | {_fmt(m['macro_auc'])} | {_fmt(m['accuracy'])} | "
                      f"{_fmt(m['ece'])} |", "", "| class | recall | precision | AUC | images |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {c} | {_fmt(m['per_class'][c]['recall'])} | {_fmt(m['per_class'][c]['precision'])} | "
                      f"{_fmt(m['per_class'][c]['auc'])} | {m['per_class'][c]['support']} |" for c in CLASSES]
            lines.append("")
            lines += _screening_lines(section.get("screening"))
        speed = m.get("train_images_per_s")
        if speed:
            what = "Feature extraction" if frozen else "Training speed"
            lines += [f"{what}: {speed:.1f} images/s{'' if frozen else ' (mean over epochs and folds)'}.", ""]
    packed = manifest.get("provenance", {}).get("packed")
    if packed:
        check = (f"; on {packed['images']} images its probabilities differ from the original's by at most "
                 f"{packed['max_prob_diff']:.1e} (top-1 agreement {packed['top1_agreement']:.3f})"
                 if "images" in packed else "")
        storage = ", ".join(f"{task} {kind}" for task, kind in packed["storage"].items())
        lines += ["## Storage", "", f"Weights stored as: {storage} (read back as float32){check}.", ""]
        if packed.get("note"):
            lines += ["## Notes", "", packed["note"], ""]
    path = bundle_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
