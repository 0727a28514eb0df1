"""``dermbatch run``: parse and check the options, then call ``dermbatch.pipeline.run``."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dermbatch.cli.app import Command, app, setup_logging, stderr
from dermbatch.errors import UsageError
from dermbatch.names import printable


class RunCommand(Command):
    """``--ray`` takes an optional address: bare, or followed by something that is not one, it means ``auto``."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_ray_address(args))


def with_ray_address(args: list[str]) -> list[str]:
    """``--ray`` at the end, or before an option or an input path, becomes ``--ray auto``."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--ray" and (i + 1 == len(args) or not _looks_like_address(args[i + 1])):
            args.insert(i + 1, "auto")
    return args


def _looks_like_address(value: str) -> bool:
    return value in ("auto", "local") or value.startswith("ray://") or (":" in value and not value.startswith("-"))


@app.command("run", cls=RunCommand)
def run_command(
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...",
        help="Image files and/or folders (jpg, png, bmp, tif)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="CSV", help="Results CSV (ISIC 2018 Task 3 format)."),
    model: Path | None = typer.Option(None, "--model", "-m", metavar="DIR",
        help="Model bundle folder [default: installed bundle]."),
    backend: str = typer.Option("auto", metavar="NAME",
        help="auto | torch | onnxruntime | openvino | tensorrt (those installed)."),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", metavar="PRECISION",
        help="auto | fp32 | fp16 | bf16 | int8: which engine (or torch autocast) "
                                               "to use."),
    tta: str | None = typer.Option(None, metavar="MODE",
        help="none | flip (4 views) | d4 (8 views) [default: the bundle's]."),
    crop_scales: str = typer.Option("1", metavar="SCALES",
        help="Classify crops of these sizes relative to the bundle's crop and average the logits, e.g. 0.85,1,1.2 "
             "(multi-scale TTA: one classifier pass per scale)."),
    folds: str = typer.Option("all", metavar="FOLDS", help="'all' or fold numbers, e.g. 0,2."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, metavar="N", help="Images per forward batch."),
    workers: int = typer.Option(2, min=0, metavar="N", help="Decode threads (0: decode in the main thread)."),
    max_file_size: str = typer.Option("512M", metavar="SIZE",
        help="Larger input files are error rows, never read, e.g. 64M or 2G; 0: no limit."),
    masks: Path | None = typer.Option(None, metavar="DIR", help="Write <id>_segmentation.png masks (0/255) here."),
    annotate: Path | None = typer.Option(None, metavar="DIR", help="Write annotated images here."),
    crops: Path | None = typer.Option(None, metavar="DIR", help="Write the classifier's lesion crops here."),
    details: Path | None = typer.Option(None, metavar="CSV", help="Details CSV [default: <out stem>_details.csv]."),
    explain: Path | None = typer.Option(None, metavar="DIR",
        help="Write Grad-CAM heatmaps of the predicted class here."),
    guided: bool = typer.Option(False, "--guided", help="With --explain: guided Grad-CAM images too."),
    report: Path | None = typer.Option(None, metavar="DIR",
        help="Write a static HTML report (index.html + thumbnails) here."),
    screen: list[str] = typer.Option([], "--screen", metavar="SCORE@SENS",
        help="Flag images as suspicious at a stored operating point: mel@0.90, malignant@0.95 (repeatable, or "
             "comma-separated); adds score_* and suspicious_* columns to the CSV."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already in --out and append the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Descend into sub-folders."),
    ray: str | None = typer.Option(None, "--ray", metavar="[ADDRESS]",
        help="Predict on a Ray cluster: auto (ray.init() finds it; the default when no address follows), "
             "host:6379 or ray://host:10001. Needs dermbatch[ray]."),
    ray_actors: int | None = typer.Option(None, "--ray-actors", min=1, metavar="N",
        help="With --ray: predictor actors [default: one per GPU, else one per --ray-cpus-per-actor CPUs]."),
    ray_cpus_per_actor: float | None = typer.Option(None, "--ray-cpus-per-actor", metavar="N",
        help="With --ray: CPUs each actor reserves (its torch/engine threads) [default: 1]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the output paths (and errors)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debugging details."),
) -> int:
    """Segment, crop and classify every image; write the CSV and the requested outputs as results arrive.

    \b
    Examples:
      dermbatch run ./images --out results.csv
      dermbatch run ./images --out results.csv --masks masks/ --annotate annotated/ --report report/
      dermbatch run a.jpg more/ --out r.csv --model my-bundle --tta d4 --folds 0,2 --batch-size 16
      dermbatch run ./images --out results.csv --resume          # continue an interrupted run
      dermbatch run ./images --out results.csv --crop-scales 0.85,1,1.2   # multi-scale TTA: 3 classifier passes
      dermbatch run ./images --out results.csv --screen mel@0.90 --screen malignant@0.95   # screening flags
      dermbatch run /shared/archive --out results.csv --ray head-node:6379 --ray-cpus-per-actor 4
    """
    from dermbatch.backends import backend_names
    from dermbatch.cli.first_use import build_default_engine
    from dermbatch.imageio import parse_size
    from dermbatch.pipeline import RunOptions, run

    setup_logging(quiet, verbose)
    if ray is not None:
        from dermbatch.cluster import require_ray

        require_ray()
    if backend not in backend_names():
        raise UsageError(f"--backend {backend!r}: available here: {', '.join(backend_names())}")
    if precision not in ("auto", "fp32", "fp16", "bf16", "int8"):
        raise UsageError(f"--precision {precision!r}: choose auto, fp32, fp16, bf16 or int8")
    options = RunOptions(inputs=[str(p) for p in inputs], out=out, model=str(model) if model else None,
                         backend=backend, device=device, precision=None if precision == "auto" else precision,
                         tta=tta, crop_scales=crop_scales, folds=folds, batch_size=batch_size, workers=workers,
                         max_file_size=parse_size(max_file_size),
                         masks=masks, annotate=annotate, crops=crops, details=details, explain=explain, guided=guided,
                         report=report, resume=resume, overwrite=overwrite, recursive=recursive, ray=ray,
                         ray_actors=ray_actors, ray_cpus_per_actor=ray_cpus_per_actor,
                         screen=tuple(s for spec in screen for s in spec.split(",") if s.strip()))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=stderr, disable=quiet, transient=False)
    state = {"task": None, "done": 0, "total": 0}

    def stop_progress() -> None:  # Rich prints a newline when a bar that never started is stopped
        if state["task"] is not None:
            progress.stop()

    def on_start(count: int) -> None:  # the bar starts with the images (an early error leaves no blank line)
        progress.start()
        state["total"] = count
        state["task"] = progress.add_task("run", total=count, rate="")

    def on_result(result) -> None:
        if not result.ok:
            progress.console.print(f"skipped {printable(str(result.path))}: {result.error}", markup=False,
                                   highlight=False, soft_wrap=True)
        state["done"] += 1
        progress.update(state["task"], advance=1)
        task = progress.tasks[0]  # results arrive a batch at a time: average over the run, not a window
        if task.elapsed:
            progress.update(state["task"], rate=f"{task.completed / task.elapsed:.2f} img/s")

    try:
        with stop_signals_interrupt():
            summary = run(options, on_start=on_start, on_result=on_result, first_use=build_default_engine)
    except KeyboardInterrupt as exc:  # answered here: Typer would turn it into a bare exit code 130
        stop_progress()
        by = f" by {signal.Signals(exc.signum).name}" if isinstance(exc, StopSignal) else ""
        print(f"Interrupted{by}: {state['done']} of {state['total']} images done this run and kept; "
              f"continue with: {resume_command()}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, StopSignal) else 130
    finally:
        stop_progress()
    if quiet:
        for path in summary.outputs.values():
            typer.echo(path)
    else:
        stderr.print(_summary_table(summary))
        for line in summary.screening:
            stderr.print(line, markup=False, highlight=False)
    return summary.exit_code


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP (how Slurm, Kubernetes and systemd stop a job, and a closed terminal): raised in the main
    thread like Ctrl-C's KeyboardInterrupt, so the run stops the same clean way, exiting with 128 + the signal's
    number (143 for SIGTERM, 129 for SIGHUP; 130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise ``StopSignal``; after the first one, both are ignored so
    that a second cannot cut the clean-up (flushing the CSVs) short. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise StopSignal(signum)

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same arguments, ``--overwrite`` replaced by ``--resume``."""
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["dermbatch", *args])


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
