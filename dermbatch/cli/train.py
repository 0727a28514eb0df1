"""``dermbatch train``: parse and check the options, then call ``trainer.train`` (imported lazily)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dermbatch.cli.app import app, setup_logging, stderr
from dermbatch.errors import UsageError

TASKS = {"seg": "segmentation", "cls": "classification", "both": "both"}


@app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create or extend."),
    task: str = typer.Option("both", help="seg | cls | both (both needs --data in the official layout)."),
    data: Path = typer.Option(Path("data"), help="Official ISIC 2018 layout (used when --task both)."),
    images: Path | None = typer.Option(None, help="Images folder (with --task seg|cls)."),
    masks: Path | None = typer.Option(None, help="Masks folder: <id>_segmentation.png (seg: required; cls: crops)."),
    labels: Path | None = typer.Option(None, help="Labels CSV (cls): label or one-hot columns, optional lesion_id."),
    folds: int = typer.Option(5, min=2, help="Number of folds (k-fold, grouped by lesion)."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    input_size: int | None = typer.Option(None, help="Square input size [default: seg 256, cls 224]."),
    encoder: str = typer.Option("tf_efficientnet_lite0", help="timm model name (smp 'tu-' encoder for seg)."),
    pretrained: str = typer.Option("imagenet", help="none | imagenet | PATH to a weights file."),
    warm_start: Path | None = typer.Option(None, "--warm-start", help="Start each fold from the same fold of "
                                           "this bundle (same model and split): train longer in a new run."),
    frozen_backbone: bool = typer.Option(False, "--frozen-backbone", help="cls: keep the pretrained backbone "
                                         "and fit only a linear classifier on its pooled stage features (minutes "
                                         "on a CPU; --epochs/--lr/... do not apply)."),
    lr: float = typer.Option(1e-3, help="Head learning rate (the backbone gets lr x --backbone-lr-mult)."),
    backbone_lr_mult: float = typer.Option(0.1, help="Differential learning rate of the pretrained backbone."),
    head_warmup_epochs: int = typer.Option(0, help="Epochs training only the head (backbone frozen)."),
    schedule: str = typer.Option("cosine", help="cosine | sgdr | onecycle."),
    sgdr_cycle: int = typer.Option(0, help="SGDR first cycle length in epochs [default: a third of the run]."),
    patience: int = typer.Option(0, help="Early stopping after N epochs without improvement (0: off)."),
    class_weights: str = typer.Option("balanced-sqrt", help="ones | balanced | balanced-sqrt (cls)."),
    focal_gamma: float = typer.Option(0.0, help="Focal loss gamma (cls; 0: cross-entropy)."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing (cls)."),
    balanced_sampling: bool = typer.Option(False, "--balanced-sampling", help="Class-balanced sampling (cls)."),
    tta: str = typer.Option("flip", help="Default TTA stored in the bundle: none | flip | d4."),
    color_constancy: str = typer.Option("none", help="none | shades_of_gray: stored in the bundle, applied by run."),
    gamma: float = typer.Option(1.0, help="Gamma correction stored in the bundle and applied by run (1: off)."),
    limit: int | None = typer.Option(None, help="Use a seeded random subset of N images (quick runs)."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(2, min=0, help="Data-loading worker processes."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    cache: Path | None = typer.Option(None, help="Decode cache [default: ~/.cache/dermbatch/train]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training from its checkpoints."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> int:
    """Train k-fold segmentation and/or classification models into a bundle that `dermbatch run` reads."""
    from dermbatch.backends.torch import resolve_device
    from dermbatch.bundle import PreprocessSpec
    from dermbatch.manifest import COLOR_CONSTANCY
    from trainer.run import plan_tasks

    setup_logging(quiet)
    if color_constancy not in COLOR_CONSTANCY:
        raise UsageError(f"--color-constancy {color_constancy!r}: choose {', '.join(COLOR_CONSTANCY)}")
    if not 0.2 <= gamma <= 5:
        raise UsageError("--gamma must be in 0.2..5")
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: choose seg, cls or both")
    fit = dict(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, backbone_lr_mult=backbone_lr_mult,
               head_warmup_epochs=head_warmup_epochs, sgdr_cycle_epochs=sgdr_cycle, patience=patience,
               balanced_sampling=balanced_sampling, seed=seed, workers=workers, device=str(resolve_device(device)))
    plans = plan_tasks(TASKS[task], out=out, data=data, images=images, masks=masks, labels=labels, folds=folds,
                       input_size=input_size, encoder=encoder, pretrained=pretrained, warm_start=warm_start,
                       frozen_backbone=frozen_backbone,
                       tta=tta, class_weights=class_weights, focal_gamma=focal_gamma, label_smoothing=label_smoothing,
                       limit=limit, cache=cache, resume=resume, fit=fit,
                       preprocessing=PreprocessSpec(color_constancy=color_constancy, gamma=gamma))
    from trainer.train import train_task

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, disable=quiet, transient=True)
    with progress:
        for plan in plans:
            metrics = train_task(plan, progress)
            headline = ("thresholded_jaccard" if plan.task == "segmentation" else "balanced_accuracy")
            stderr.print(f"{plan.task}: out-of-fold {headline} {metrics[headline]:.4f} over {metrics['images']} "
                         f"images -> {out / 'metrics.json'}")
    typer.echo(str(out))
    return 0


@app.command("lr-find")
def lr_find_command(
    task: str = typer.Option(..., help="seg | cls."),
    images: Path = typer.Option(..., help="Images folder."),
    masks: Path | None = typer.Option(None, help="Masks folder (seg: required; cls: lesion crops)."),
    labels: Path | None = typer.Option(None, help="Labels CSV (cls)."),
    out: Path = typer.Option(Path("lr_find.png"), "--out", "-o", help="Where to save the loss curve (PNG)."),
    input_size: int | None = typer.Option(None),
    encoder: str = typer.Option("tf_efficientnet_lite0"),
    pretrained: str = typer.Option("imagenet"),
    batch_size: int = typer.Option(16, "--batch-size", min=2),
    steps: int = typer.Option(100, min=10),
    limit: int | None = typer.Option(2000, help="Images to sample from (whole lesions)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    cache: Path | None = typer.Option(None),
) -> int:
    """The learning-rate range test: sweep the LR, save the loss curve as a PNG, print a suggested rate."""
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
                         focal_gamma=0.0, label_smoothing=0.0)
    lrs, losses, suggestion, spec = lr_find(plan, batch_size, steps)
    plot(lrs, losses, suggestion, out, f"LR range test: {spec.task}, {spec.encoder}, {len(plan.items)} images")
    typer.echo(f"suggested learning rate: {suggestion:.2e} (loss curve: {out})")
    return 0


@app.command("evaluate")
def evaluate_command(
    images: Path = typer.Option(..., help="Images with ground truth."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Bundle [default: installed bundle]."),
    masks: Path | None = typer.Option(None, help="Ground-truth masks (<id>_segmentation.png)."),
    labels: Path | None = typer.Option(None, help="Ground-truth labels CSV."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Folder for predictions and evaluation.json."),
    tta: str | None = typer.Option(None),
    folds: str = typer.Option("all"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    workers: int = typer.Option(2, min=0),
    device: str = typer.Option("auto"),
    backend: str = typer.Option("auto"),
    precision: str = typer.Option("auto", help="auto | fp32 | fp16 | int8 (engine precision)."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM of every crop for the report."),
) -> int:
    """Run the pipeline on images with ground truth; write the ISIC metrics and an HTML report with plots."""
    from dermbatch.cli.first_use import build_default_engine
    from trainer.evaluate import evaluate
    from trainer.metrics import headline

    setup_logging()
    if masks is None and labels is None:
        raise UsageError("evaluate needs --masks and/or --labels to score against")
    report = evaluate(str(model) if model else None, images, out, masks=masks, labels=labels, explain=explain,
                      tta=tta, folds=folds, batch_size=batch_size, workers=workers, device=device, backend=backend,
                      precision=None if precision == "auto" else precision, first_use=build_default_engine)
    for task in ("segmentation", "classification"):
        if task in report:
            stderr.print(f"{task}: {headline(task, report[task])}")
    typer.echo(str(out / "evaluation.json"))
    typer.echo(str(out / "report.html"))
    return 3 if report["failed"] else 0


@app.command("pack")
def pack_command(
    model: Path = typer.Option(..., "--model", "-m", help="Trained bundle to pack."),
    out: Path = typer.Option(..., "--out", "-o", help="New bundle folder."),
    half: str = typer.Option("seg,cls", help="Models stored as float16 (half the size): seg, cls, seg,cls, none."),
    check_images: Path | None = typer.Option(None, help="Images to compare the packed bundle with the original."),
    tolerance: float = typer.Option(1e-3, help="Largest probability difference accepted by the check."),
    name: str | None = typer.Option(None, help="Bundle name [default: the original's]."),
    note: str | None = typer.Option(None, help="A note for the model card (how the training deviated, …)."),
) -> int:
    """Copy a trained bundle for distribution (weights, manifest, metrics, splits, logs, model card)."""
    from trainer.package import pack_bundle, parse_half

    setup_logging()
    pack_bundle(model, out, half=parse_half(half), check_images=check_images, tolerance=tolerance, name=name,
                note=note)
    typer.echo(str(out))
    return 0
