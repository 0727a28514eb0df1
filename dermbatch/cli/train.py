"""``dermbatch train``: parse and check the options, then call ``trainer.train`` (imported lazily)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dermbatch.cli.app import Command, app, setup_logging, stderr
from dermbatch.errors import UsageError

TASKS = {"seg": "segmentation", "cls": "classification", "both": "both"}


def progress_bar(disable: bool = False) -> Progress:
    """The training commands' Rich progress bars (on stderr, gone when done)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=stderr, disable=disable, transient=True)


class TrainCommand(Command):
    """Keeps the raw arguments: ``--nproc N`` relaunches the same command under torchrun."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ctx.meta["dermbatch.argv"] = list(args)
        return super().parse_args(ctx, args)


def without_nproc(args: list[str]) -> list[str]:
    """The command's arguments less ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch_torchrun(argv: list[str], nproc: int, device: str) -> int:
    """``dermbatch train ... --nproc N`` = ``torchrun --standalone --nproc-per-node N -m dermbatch train ...``,
    each process with its share of the CPU threads (torchrun's own default is 1)."""
    import os
    import subprocess
    import sys

    args = without_nproc(argv)
    env = dict(os.environ)
    if not device.startswith("cuda"):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dermbatch", "train", *args]
    stderr.print(f"launching {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m dermbatch train "
                 + " ".join(args))
    return subprocess.run(command, env=env).returncode


@app.command("train", cls=TrainCommand)
def train_command(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Bundle folder to create or extend."),
    task: str = typer.Option("both", metavar="TASK",
        help="seg | cls | both (both needs --data in the official layout)."),
    data: Path = typer.Option(Path("data"), metavar="DIR", help="Official ISIC 2018 layout (used when --task both)."),
    images: Path | None = typer.Option(None, metavar="DIR", help="Images folder (with --task seg|cls)."),
    masks: Path | None = typer.Option(None, metavar="DIR",
        help="Masks folder: <id>_segmentation.png (seg: required; cls: crops)."),
    labels: Path | None = typer.Option(None, metavar="CSV",
        help="Labels CSV (cls): label or one-hot columns, optional lesion_id."),
    folds: int = typer.Option(5, min=2, metavar="FOLDS", help="Number of folds (k-fold, grouped by lesion)."),
    epochs: int = typer.Option(10, min=1, metavar="N"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, metavar="N"),
    input_size: int | None = typer.Option(None, metavar="PX", help="Square input size [default: seg 256, cls 224]."),
    encoder: str = typer.Option("tf_efficientnet_lite0", metavar="NAME",
        help="timm model name (smp 'tu-' encoder for seg)."),
    pretrained: str = typer.Option("imagenet", metavar="WEIGHTS", help="none | imagenet | PATH to a weights file."),
    warm_start: Path | None = typer.Option(None, "--warm-start", metavar="DIR",
        help="Start each fold from the same fold of "
                                           "this bundle (same model and split): train longer in a new run."),
    frozen_backbone: bool = typer.Option(False, "--frozen-backbone", help="cls: keep the pretrained backbone "
                                         "and fit only a linear classifier on its pooled stage features (minutes "
                                         "on a CPU; --epochs/--lr/... do not apply)."),
    tune_stages: int | None = typer.Option(None, "--tune-stages", metavar="K", min=1,
        help="cls: freeze the stem and stages 0..K-1 at their ImageNet weights, cache their output once per "
             "image and view (8 dihedral views + --jitter-views), and fine-tune stages K.. with rank "
             "--lora-rank updates, their batch-norm scales and a linear-probe-initialised classifier (LP-FT). "
             "Tens of images/s on a CPU; each fold stores a few hundred kB."),
    lora_rank: int = typer.Option(4, "--lora-rank", metavar="R", min=0,
        help="With --tune-stages: rank of the update of every 1x1 convolution of the tuned stages (0: none)."),
    prior_correction: bool = typer.Option(False, "--prior-correction",
        help="With --tune-stages: calibrate each fold on an inner split of its training images (a model trained "
             "there for half the epochs): divide the logits by a temperature chosen by log loss, then subtract "
             "tau x log(class frequency), tau chosen by balanced accuracy (both folded into the classifier); it "
             "trades accuracy on frequent classes for recall on rare ones."),
    tune_depthwise: bool = typer.Option(False, "--tune-depthwise",
        help="With --tune-stages: also tune the depthwise kernels of those stages (stored whole per fold)."),
    jitter_views: int = typer.Option(8, "--jitter-views", metavar="N", min=0,
        help="With --tune-stages: cached views per image besides the 8 dihedral ones (scale/shift crop, colour "
             "jitter)."),
    extra_images: Path | None = typer.Option(None, metavar="DIR",
        help="With --tune-stages: more labelled images for the training side of every fold (never held out, "
             "never in the out-of-fold metrics), e.g. ISIC 2018 Task 1 images with their ISIC 2017 diagnoses."),
    extra_labels: Path | None = typer.Option(None, metavar="CSV",
        help="Labels of --extra-images: label or one-hot columns, or isic2017_label (melanoma, "
             "seborrheic_keratosis, nevus; rows without one are skipped)."),
    extra_masks: Path | None = typer.Option(None, metavar="DIR", help="Masks of --extra-images (lesion crops)."),
    extra_classes: str | None = typer.Option(None, metavar="CLASSES",
        help="Keep only these classes of the extra images, e.g. MEL,BKL."),
    lr: float = typer.Option(1e-3, metavar="LR",
        help="Head learning rate (the backbone gets lr x --backbone-lr-mult)."),
    backbone_lr_mult: float = typer.Option(0.1, metavar="X",
        help="Differential learning rate of the pretrained backbone."),
    head_warmup_epochs: int = typer.Option(0, metavar="N", help="Epochs training only the head (backbone frozen)."),
    schedule: str = typer.Option("cosine", metavar="NAME", help="cosine | sgdr | onecycle."),
    sgdr_cycle: int = typer.Option(0, metavar="EPOCHS",
        help="SGDR first cycle length in epochs [default: a third of the run]."),
    patience: int = typer.Option(0, metavar="N", help="Early stopping after N epochs without improvement (0: off)."),
    class_weights: str = typer.Option("balanced-sqrt", metavar="MODE", help="ones | balanced | balanced-sqrt (cls)."),
    focal_gamma: float = typer.Option(0.0, metavar="GAMMA", help="Focal loss gamma (cls; 0: cross-entropy)."),
    label_smoothing: float = typer.Option(0.0, metavar="EPS", help="Label smoothing (cls)."),
    balanced_sampling: bool = typer.Option(False, "--balanced-sampling", help="Class-balanced sampling (cls)."),
    tta: str = typer.Option("flip", metavar="MODE", help="Default TTA stored in the bundle: none | flip | d4."),
    color_constancy: str = typer.Option("none", metavar="MODE",
        help="none | shades_of_gray: stored in the bundle, applied by run."),
    gamma: float = typer.Option(1.0, metavar="GAMMA",
        help="Gamma correction stored in the bundle and applied by run (1: off)."),
    limit: int | None = typer.Option(None, metavar="N", help="Use a seeded random subset of N images (quick runs)."),
    seed: int = typer.Option(0, metavar="N"),
    workers: int = typer.Option(2, min=0, metavar="N",
        help="Data-loading worker processes (with --tune-stages: the processes that make the cached views)."),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
    cache: Path | None = typer.Option(None, metavar="DIR", help="Decode cache [default: ~/.cache/dermbatch/train]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training from its checkpoints."),
    nproc: int = typer.Option(1, "--nproc", min=1, metavar="N",
        help="Train each fold with N processes (DistributedDataParallel: gloo on CPU, nccl with one GPU each), "
             "launched with torchrun; --batch-size is the global batch. The same as `torchrun "
             "--nproc-per-node N -m dermbatch train ...` (multi-node: run that with torchrun's --nnodes options)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> int:
    """Train k-fold segmentation and/or classification models into a bundle that `dermbatch run` reads.

    \b
    Examples:
      dermbatch train --data isic2018/ --out my-bundle --folds 5
      dermbatch train --task seg --images isic/images --masks isic/masks --out my-bundle --input-size 128
      dermbatch train --task cls --images ham/images --labels ham/labels.csv --masks ham/masks --out my-bundle \\
          --input-size 128 --tune-stages 3 --lora-rank 6 --prior-correction --epochs 10 --batch-size 64 --lr 1e-3 \\
          --backbone-lr-mult 1        # the default bundle's classifier
      dermbatch train --task cls ... --out my-bundle --tune-stages 3 --input-size 224 --epochs 20 \\
          --batch-size 128 --device cuda --workers 14     # the same recipe on a GPU (bfloat16 autocast)
      dermbatch train --task cls --images ham/images --labels ham/labels.csv --out my-bundle --frozen-backbone
      dermbatch train --task cls ... --out my-bundle --resume      # continue after an interruption
      dermbatch train --task seg --images isic/images --masks isic/masks --out my-bundle --nproc 2
    """
    import os

    from dermbatch.backends.torch import resolve_device
    from dermbatch.bundle import PreprocessSpec
    from dermbatch.manifest import COLOR_CONSTANCY
    from trainer import distributed
    from trainer.run import plan_tasks

    ranked = distributed.launched()  # one of torchrun's processes
    main = int(os.environ.get("RANK", "0")) == 0  # rank 0 alone logs, shows progress and prints the results
    setup_logging(quiet or not main)
    if color_constancy not in COLOR_CONSTANCY:
        raise UsageError(f"--color-constancy {color_constancy!r}: choose {', '.join(COLOR_CONSTANCY)}")
    if not 0.2 <= gamma <= 5:
        raise UsageError("--gamma must be in 0.2..5")
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: choose seg, cls or both")
    distributed.check_options(nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", "1")), batch_size,
                              frozen_backbone, tune_stages)
    resolved = str(resolve_device(device))
    if nproc > 1 and resolved.startswith("cuda"):
        import torch

        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc} on CUDA runs one process per GPU; this machine has "
                             f"{torch.cuda.device_count()}")
    if nproc > 1 and not ranked:
        return launch_torchrun(ctx.meta["dermbatch.argv"], nproc, resolved)
    if ranked:
        resolved = distributed.setup(resolved)
    fit = dict(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, backbone_lr_mult=backbone_lr_mult,
               head_warmup_epochs=head_warmup_epochs, sgdr_cycle_epochs=sgdr_cycle, patience=patience,
               balanced_sampling=balanced_sampling, seed=seed, workers=workers, device=resolved)
    plans = plan_tasks(TASKS[task], out=out, data=data, images=images, masks=masks, labels=labels, folds=folds,
                       input_size=input_size, encoder=encoder, pretrained=pretrained, warm_start=warm_start,
                       frozen_backbone=frozen_backbone, tune_stages=tune_stages, lora_rank=lora_rank,
                       tune_depthwise=tune_depthwise, prior_correction=prior_correction,
                       jitter_views=jitter_views, tta=tta, class_weights=class_weights, focal_gamma=focal_gamma,
                       label_smoothing=label_smoothing,
                       limit=limit, cache=cache, resume=resume, fit=fit,
                       extra=(extra_images, extra_labels, extra_masks, extra_classes)
                       if extra_images or extra_labels else None,
                       preprocessing=PreprocessSpec(color_constancy=color_constancy, gamma=gamma))
    from trainer.train import train_task

    progress = progress_bar(disable=quiet or not main)
    try:
        with progress:
            for plan in plans:
                metrics = train_task(plan, progress)
                if not main:
                    continue
                headline = ("thresholded_jaccard" if plan.task == "segmentation" else "balanced_accuracy")
                stderr.print(f"{plan.task}: out-of-fold {headline} {metrics[headline]:.4f} over "
                             f"{metrics['images']} images -> {out / 'metrics.json'}")
    finally:
        distributed.teardown()
    if main:
        typer.echo(str(out))
    return 0


@app.command("lr-find", cls=Command)
def lr_find_command(
    task: str = typer.Option(..., metavar="TASK", help="seg | cls."),
    images: Path = typer.Option(..., metavar="DIR", help="Images folder."),
    masks: Path | None = typer.Option(None, metavar="DIR", help="Masks folder (seg: required; cls: lesion crops)."),
    labels: Path | None = typer.Option(None, metavar="CSV", help="Labels CSV (cls)."),
    out: Path = typer.Option(Path("lr_find.png"), "--out", "-o", metavar="PNG",
        help="Where to save the loss curve (PNG)."),
    input_size: int | None = typer.Option(None, metavar="PX", help="Square input size (default: seg 256, cls 224)."),
    encoder: str = typer.Option("tf_efficientnet_lite0", metavar="NAME", help="timm model name, as for train."),
    pretrained: str = typer.Option("imagenet", metavar="WEIGHTS", help="none | imagenet | PATH to a weights file."),
    batch_size: int = typer.Option(16, "--batch-size", min=2, metavar="N", help="Images per step."),
    steps: int = typer.Option(100, min=10, metavar="N", help="Steps of the sweep (the LR grows each step)."),
    limit: int | None = typer.Option(2000, metavar="N", help="Images to sample from (whole lesions)."),
    seed: int = typer.Option(0, metavar="N", help="Seed of the sample and the sweep."),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
    cache: Path | None = typer.Option(None, metavar="DIR", help="Decode cache (default: ~/.cache/dermbatch/train)."),
    tune_stages: int | None = typer.Option(None, "--tune-stages", metavar="K", min=1,
        help="Sweep the --tune-stages recipe (its trainable part over its cached trunk, from its linear probe)."),
    lora_rank: int = typer.Option(4, "--lora-rank", metavar="R", min=0, help="With --tune-stages, as for train."),
    tune_depthwise: bool = typer.Option(False, "--tune-depthwise", help="With --tune-stages, as for train."),
    jitter_views: int = typer.Option(8, "--jitter-views", metavar="N", min=0, help="With --tune-stages, as for train."),
) -> int:
    """The learning-rate range test: sweep the LR, save the loss curve as a PNG, print a suggested rate.

    \b
    Examples:
      dermbatch lr-find --task cls --images ham/images --labels ham/labels.csv --masks ham/masks --input-size 128
      dermbatch lr-find --task seg --images isic/images --masks isic/masks --steps 200 -o seg_lr.png
      dermbatch lr-find --task cls --images ham/images --labels ham/labels.csv --masks ham/masks --input-size 128 \\
          --tune-stages 5 --lora-rank 0 --tune-depthwise
    """
    from dermbatch.backends.torch import resolve_device
    from trainer.lr_find import lr_find, plot
    from trainer.run import plan_tasks

    setup_logging()
    if task not in ("seg", "cls"):
        raise UsageError(f"--task {task!r}: choose seg or cls")
    fit = dict(epochs=1, batch_size=batch_size, lr=1e-3, schedule="cosine", seed=seed, workers=0,
               device=str(resolve_device(device)))
    (plan,) = plan_tasks(TASKS[task], out=out.parent, data=Path("."), images=images, masks=masks, labels=labels,
                         limit=limit, cache=cache, resume=False, fit=fit, folds=2, input_size=input_size,
                         encoder=encoder, pretrained=pretrained, tta="none", class_weights="balanced-sqrt",
                         focal_gamma=0.0, label_smoothing=0.0, tune_stages=tune_stages, lora_rank=lora_rank,
                         tune_depthwise=tune_depthwise, jitter_views=jitter_views)
    lrs, losses, suggestion, spec = lr_find(plan, batch_size, steps)
    plot(lrs, losses, suggestion, out, f"LR range test: {spec.task}, {spec.encoder}, {len(plan.items)} images")
    typer.echo(f"suggested learning rate: {suggestion:.2e} (loss curve: {out})")
    return 0


@app.command("calibrate-masks", cls=Command)
def calibrate_masks_command(
    model: Path = typer.Option(..., "--model", "-m", metavar="DIR", help="Bundle whose segmentation to calibrate "
                               "(its bundle.json and model card are updated)."),
    images: Path = typer.Option(..., metavar="DIR", help="Images with expert masks, not used to train the U-Net."),
    masks: Path = typer.Option(..., metavar="DIR", help="Their masks (<id>_segmentation.png)."),
    labels: Path | None = typer.Option(None, metavar="CSV",
        help="CSV with image_id and lesion_id: the inner cross-validation keeps each lesion in one fold."),
    limit: int | None = typer.Option(None, metavar="N", min=10, help="Use a seeded random subset of N images."),
    max_missed: float = typer.Option(0.01, "--max-missed", metavar="P", min=0.0, max=0.5,
        help="Share of real lesions (out of fold) the no-lesion decision may miss; sets its threshold."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, metavar="N", help="Images per forward batch."),
    seed: int = typer.Option(0, metavar="N", help="Seed of the subset, the skin views and the inner folds."),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
) -> int:
    """Fit the bundle's mask-quality models: mask_quality (P(Jaccard >= 0.65)) and the no-lesion decision.

    Runs the bundle's segmentation on images with expert masks and on lesion-free skin views cut from them, and
    fits two logistic models on shape and confidence statistics of each mask, their L2 strength chosen by a
    lesion-grouped inner cross-validation; prints the out-of-fold scores. `run` then writes mask_quality and
    lesion_probability in the details CSV and classifies the whole image when no lesion is shown.

    \b
    Examples:
      dermbatch calibrate-masks --model my-bundle --images ham/images --masks ham/masks --labels ham/labels.csv
      dermbatch calibrate-masks --model my-bundle --images held-out/images --masks held-out/masks --limit 500
    """
    from trainer.quality import calibrate_masks

    setup_logging()
    if not (model / "bundle.json").is_file():
        raise UsageError(f"--model {model}: not a bundle folder (no bundle.json)")
    with progress_bar() as progress:
        report = calibrate_masks(model, images, masks, labels=labels, limit=limit, seed=seed, max_missed=max_missed,
                                 batch_size=batch_size, device=device, command=sys.argv, progress=progress)
    rel, les = report["reliable"], report["lesion"]
    stderr.print(f"mask_quality: out-of-fold AUC {rel['oof_auc']:.3f}, Brier {rel['oof_brier']:.3f}, calibration "
                 f"error {rel['oof_calibration_error']:.3f}; no lesion below {les['threshold']:.3f}: "
                 f"{les['oof_missed_lesions']:.1%} of lesions missed, {les['oof_skin_views_rejected']:.1%} of "
                 "skin views rejected (out of fold)")
    typer.echo(str(model / "bundle.json"))
    return 0


@app.command("evaluate", cls=Command)
def evaluate_command(
    images: Path = typer.Option(..., metavar="DIR", help="Images with ground truth."),
    model: Path | None = typer.Option(None, "--model", "-m", metavar="DIR", help="Bundle [default: installed bundle]."),
    masks: Path | None = typer.Option(None, metavar="DIR", help="Ground-truth masks (<id>_segmentation.png)."),
    labels: Path | None = typer.Option(None, metavar="CSV", help="Ground-truth labels CSV."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", metavar="DIR",
        help="Folder for predictions and evaluation.json."),
    tta: str | None = typer.Option(None, metavar="MODE", help="none | flip | d4 (default: the bundle's)."),
    crop_scales: str = typer.Option("1", metavar="SCALES",
                                    help="Classifier crop sizes to average, as for run, e.g. 0.85,1,1.2."),
    folds: str = typer.Option("all", metavar="FOLDS", help="'all' or fold numbers, e.g. 0,2."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, metavar="N", help="Images per forward batch."),
    workers: int = typer.Option(2, min=0, metavar="N", help="Decode threads (0: decode in the main thread)."),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
    backend: str = typer.Option("auto", metavar="NAME", help="auto | torch | onnxruntime | openvino | tensorrt."),
    precision: str = typer.Option("auto", metavar="PRECISION",
                                  help="auto | fp32 | fp16 | bf16 | int8 (engine precision, as for run)."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM of every crop for the report."),
) -> int:
    """Run the pipeline on images with ground truth; write the ISIC metrics and an HTML report with plots.

    \b
    Examples:
      dermbatch evaluate --images ham/images --labels ham/labels.csv -o eval/
      dermbatch evaluate --images isic/images --masks isic/masks --model my-bundle --backend onnxruntime
    """
    from dermbatch.cli.first_use import build_default_engine
    from trainer.evaluate import evaluate
    from trainer.metrics import headline

    setup_logging()
    if masks is None and labels is None:
        raise UsageError("evaluate needs --masks and/or --labels to score against")
    report = evaluate(str(model) if model else None, images, out, masks=masks, labels=labels, explain=explain,
                      tta=tta, crop_scales=crop_scales, folds=folds, batch_size=batch_size, workers=workers,
                      device=device, backend=backend, precision=None if precision == "auto" else precision,
                      first_use=build_default_engine)
    for task in ("segmentation", "classification"):
        if task in report:
            stderr.print(f"{task}: {headline(task, report[task])}")
    typer.echo(str(out / "evaluation.json"))
    typer.echo(str(out / "report.html"))
    return 3 if report["failed"] else 0


@app.command("pack", cls=Command)
def pack_command(
    model: Path = typer.Option(..., "--model", "-m", metavar="DIR", help="Trained bundle to pack."),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="New bundle folder."),
    half: str = typer.Option("seg,cls", metavar="MODELS",
        help="Stored as float16 (half the size): seg, cls, lora (only the low-rank updates of --tune-stages "
             "folds), comma-separated, or none."),
    check_images: Path | None = typer.Option(None, metavar="DIR",
        help="Images to compare the packed bundle with the original."),
    tolerance: float = typer.Option(1e-3, metavar="P", help="Largest probability difference accepted by the check."),
    name: str | None = typer.Option(None, metavar="NAME", help="Bundle name [default: the original's]."),
    note: str | None = typer.Option(None, metavar="TEXT",
        help="A note for the model card (how the training deviated, …)."),
) -> int:
    """Copy a trained bundle for distribution (weights, manifest, metrics, splits, logs, model card).

    \b
    Examples:
      dermbatch pack --model runs/b1 --out dist/b1 --half none --check-images ham/images
      dermbatch pack --model runs/b1 --out dist/b1-fp16 --half cls --check-images ham/images --tolerance 1e-3
      dermbatch pack --model runs/tuned --out dist/tuned --half lora --check-images ham/images
    """
    from trainer.package import pack_bundle, parse_half

    setup_logging()
    pack_bundle(model, out, half=parse_half(half), check_images=check_images, tolerance=tolerance, name=name,
                note=note)
    typer.echo(str(out))
    return 0
