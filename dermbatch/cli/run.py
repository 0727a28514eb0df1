"""``dermbatch run``: parse and check the options, then call ``dermbatch.pipeline.run``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dermbatch.cli.app import app, setup_logging, stderr
from dermbatch.errors import UsageError


@app.command("run")
def run_command(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (jpg, png, bmp, tif)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results CSV (ISIC 2018 Task 3 format)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model bundle folder [default: installed bundle]."),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime | openvino | tensorrt (those installed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto | fp32 | fp16 | bf16 | int8: which engine (or torch autocast) "
                                               "to use."),
    tta: str | None = typer.Option(None, help="none | flip (4 views) | d4 (8 views) [default: the bundle's]."),
    folds: str = typer.Option("all", help="'all' or fold numbers, e.g. 0,2."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per forward batch."),
    workers: int = typer.Option(2, min=0, help="Decode threads (0: decode in the main thread)."),
    masks: Path | None = typer.Option(None, help="Write <id>_segmentation.png masks (0/255) here."),
    annotate: Path | None = typer.Option(None, help="Write annotated images here."),
    crops: Path | None = typer.Option(None, help="Write the classifier's lesion crops here."),
    details: Path | None = typer.Option(None, help="Details CSV [default: <out stem>_details.csv]."),
    explain: Path | None = typer.Option(None, help="Write Grad-CAM heatmaps of the predicted class here."),
    guided: bool = typer.Option(False, "--guided", help="With --explain: guided Grad-CAM images too."),
    report: Path | None = typer.Option(None, help="Write a static HTML report (index.html + thumbnails) here."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already in --out and append the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Descend into sub-folders."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the output paths (and errors)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debugging details."),
) -> int:
    """Segment, crop and classify every image; write the CSV and the requested outputs as results arrive."""
    from dermbatch.backends import backend_names
    from dermbatch.cli.first_use import build_default_engine
    from dermbatch.pipeline import RunOptions, run

    setup_logging(quiet, verbose)
    if backend not in backend_names():
        raise UsageError(f"--backend {backend!r}: available here: {', '.join(backend_names())}")
    if precision not in ("auto", "fp32", "fp16", "bf16", "int8"):
        raise UsageError(f"--precision {precision!r}: choose auto, fp32, fp16, bf16 or int8")
    options = RunOptions(inputs=[str(p) for p in inputs], out=out, model=str(model) if model else None,
                         backend=backend, device=device, precision=None if precision == "auto" else precision,
                         tta=tta, folds=folds, batch_size=batch_size, workers=workers, masks=masks,
                         annotate=annotate, crops=crops, details=details, explain=explain, guided=guided,
                         report=report,
                         resume=resume, overwrite=overwrite, recursive=recursive)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=stderr, disable=quiet, transient=False)
    state = {"task": None}

    def on_start(count: int) -> None:
        state["task"] = progress.add_task("run", total=count, rate="")

    def on_result(result) -> None:
        if not result.ok:
            progress.console.print(f"skipped {result.path}: {result.error}", markup=False, highlight=False,
                                   soft_wrap=True)
        progress.update(state["task"], advance=1)
        task = progress.tasks[0]  # results arrive a batch at a time: average over the run, not a window
        if task.elapsed:
            progress.update(state["task"], rate=f"{task.completed / task.elapsed:.2f} img/s")

    with progress:
        summary = run(options, on_start=on_start, on_result=on_result, first_use=build_default_engine)
    if quiet:
        for path in summary.outputs.values():
            typer.echo(path)
    else:
        stderr.print(_summary_table(summary))
    return summary.exit_code


def _summary_table(summary) -> Table:
    table = Table(title="dermbatch run", show_header=False, box=None)
    table.add_row("images", f"{summary.total} found, {summary.skipped} already done, "
                            f"{summary.ok} processed, {summary.failed} failed")
    table.add_row("time", f"{summary.elapsed:.1f} s")
    for stage, rate in summary.rates().items():
        table.add_row(f"{stage} speed", f"{rate:.2f} images/s")
    for name, path in summary.outputs.items():
        table.add_row(name, path)
    return table
