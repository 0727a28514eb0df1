"""``dermbatch models`` and ``dermbatch info``: which bundles are installed and what one contains."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from dermbatch.cli.app import Command, app, console
from dermbatch.errors import DermbatchError

WARNING = "Research tool, not a medical device: do not use its output to diagnose or treat anyone."


@app.command("models", cls=Command)
def models_command(
    search: list[Path] = typer.Argument(None, metavar="[DIR]...", help="Also list bundles in these folders."),
) -> int:
    """List installed model bundles (the packaged default, $DERMBATCH_MODEL, and folders given).

    \b
    Examples:
      dermbatch models
      dermbatch models runs/ other-bundles/
    """
    from dermbatch.catalog import installed_bundles, load_summary

    table = Table("found as", "name", "path", "folds (seg / cls)", "OOF headline")
    for origin, path in installed_bundles(list(search or [])):
        try:
            s = load_summary(path)
        except DermbatchError as exc:
            table.add_row(origin, "(invalid)", str(path), "", str(exc))
            continue
        seg, cls = s["segmentation"] or {}, s["classification"] or {}
        headline = ", ".join(f"{k} {v:.3f}" for k, v in [*seg.get("oof_metrics", {}).items()][:1] +
                             [*cls.get("oof_metrics", {}).items()][:1])
        table.add_row(origin, s["name"], str(path), f"{seg.get('folds', '–')} / {cls.get('folds', '–')}", headline)
    if not table.rows:
        typer.echo("no bundles found: pass --model DIR to dermbatch run, or train one with dermbatch train")
        return 0
    console().print(table)
    return 0


@app.command("info", cls=Command)
def info_command(
    model: Path | None = typer.Option(None, "--model", "-m", metavar="DIR", help="Bundle [default: installed bundle]."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> int:
    """Summarise a bundle: models, folds, training data, out-of-fold metrics, engines, intended use.

    \b
    Examples:
      dermbatch info
      dermbatch info --model my-bundle --json
    """
    from dermbatch.catalog import load_summary

    s = load_summary(model)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return 0
    out = console()
    out.print(f"[bold]{s['name']}[/bold]  {s['path']}")
    out.print(WARNING, style="yellow")
    for task in ("segmentation", "classification"):
        entry = s[task]
        if entry is None:
            out.print(f"{task}: none")
            continue
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["oof_metrics"].items()) or "no OOF metrics"
        out.print(f"{task}: {entry['model']}, input {entry['input']}, folds {entry['folds']}, TTA {entry['tta']}"
                  f"\n  data: {entry['data']}\n  out-of-fold: {metrics}", highlight=False)
        quality = entry.get("mask_quality")
        if quality:
            out.print(f"  mask quality: calibrated on {quality['images']} images of {quality['data']}; out-of-fold AUC "
                      f"{quality['reliable_oof_auc']:.3f} (Jaccard >= 0.65), {quality['lesion_oof_auc']:.3f} (lesion "
                      f"shown; none below {quality['lesion_threshold']:.3f})", highlight=False)
    crop, pre = s["crop"], s["preprocessing"]
    out.print(f"crop: margin {crop['margin']}, {'square' if crop['square'] else 'box'}, background "
              f"{crop['background']}; preprocessing: colour constancy {pre['color_constancy']}, gamma {pre['gamma']}",
              highlight=False)
    out.print(f"engines: {', '.join(s['engines']) or 'none (dermbatch build-engine)'}", highlight=False)
    if s["model_card"]:
        out.print(f"model card: {s['model_card']}", highlight=False)
    return 0
