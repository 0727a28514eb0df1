"""``dermbatch operating-points``: choose a bundle's screening thresholds out of fold and store them in it."""

from __future__ import annotations

from pathlib import Path

import typer

from dermbatch.cli.app import Command, app, setup_logging, stderr
from dermbatch.errors import UsageError


@app.command("operating-points", cls=Command)
def operating_points_command(
    model: Path = typer.Option(..., "--model", "-m", metavar="DIR",
        help="Bundle to add the points to (its bundle.json is rewritten)."),
    labels: Path = typer.Option(..., metavar="CSV",
        help="Labels CSV with lesion_id: the bootstrap resamples whole lesions."),
    oof: Path | None = typer.Option(None, metavar="DIR",
        help="Out-of-fold predictions cls_fold*.csv [default: the bundle's oof/ folder, made when missing]."),
    images: Path | None = typer.Option(None, metavar="DIR",
        help="The training images: with --masks, to make the out-of-fold predictions again from splits.json."),
    masks: Path | None = typer.Option(None, metavar="DIR", help="Their lesion masks (the crops training scored)."),
    targets: str = typer.Option("0.80,0.90,0.95", metavar="SENS", help="Target sensitivities, comma-separated."),
    bootstrap: int = typer.Option(2000, min=100, metavar="N", help="Bootstrap resamples (of lesions)."),
    device: str = typer.Option("cpu", metavar="DEVICE", help="Where to make missing predictions: cpu | cuda."),
) -> int:
    """Choose, from out-of-fold predictions, the thresholds of the melanoma score P(MEL) and the malignancy score
    P(MEL)+P(BCC)+P(AKIEC) that reach each target sensitivity, with the specificity that costs and lesion-grouped
    bootstrap 95 % intervals; store them in the bundle for `dermbatch run --screen`.

    \b
    Examples:
      dermbatch operating-points --model my-bundle --labels ham/labels.csv
      dermbatch operating-points --model my-bundle --labels ham/labels.csv --images ham/images --masks ham/masks
    """
    from dermbatch.bundle import load_bundle
    from trainer.card import screening_table
    from trainer.data import cls_items, read_labels
    from trainer.operating_points import oof_files, points_from_oof, predict_oof, store_points

    setup_logging()
    try:
        wanted = tuple(float(t) for t in targets.split(","))
    except ValueError:
        raise UsageError(f"--targets {targets!r}: give sensitivities like 0.80,0.90,0.95") from None
    if not all(0 < t < 1 for t in wanted):
        raise UsageError(f"--targets {targets!r}: each sensitivity must be between 0 and 1")
    bundle = load_bundle(model)
    folder = oof or model / "oof"
    if not oof_files(folder):
        if images is None or masks is None:
            raise UsageError(f"{folder}: no out-of-fold predictions (cls_fold*.csv); pass --oof DIR, or --images and "
                             "--masks to make them from the bundle's splits.json")
        predict_oof(bundle, cls_items(images, labels, masks), folder, device)
    groups = {image_id: lesion for image_id, (_, lesion) in read_labels(labels).items()}
    points, source = points_from_oof(oof_files(folder), groups, wanted, bootstrap)
    path = store_points(model, points, source)
    stderr.print("\n".join(screening_table(points)), markup=False, highlight=False)
    typer.echo(str(path))
    return 0
