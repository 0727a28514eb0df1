"""``dermbatch run`` as a library function: inputs -> predictor -> writer, with resume and a run manifest."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from dermbatch import __version__
from dermbatch.bundle import load_bundle
from dermbatch.errors import OutputError, UsageError
from dermbatch.imageio import DEFAULT_MAX_BYTES
from dermbatch.inputs import InputImage, discover_inputs
from dermbatch.loader import batched
from dermbatch.outputs import (
    DETAIL_COLUMNS,
    RESULT_COLUMNS,
    CsvAppender,
    RunLock,
    read_complete_rows,
    write_bytes_atomic,
)
from dermbatch.predictor import Predictor
from dermbatch.report import write_report
from dermbatch.result import Result
from dermbatch.screening import OperatingPoint, parse_screen, result_columns, screen_values, select_points, summary_line
from dermbatch.writer import OutputWriter

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "timm", "segmentation-models-pytorch", "opencv-python-headless", "opencv-python",
                      "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "safetensors")


@dataclass
class RunOptions:
    inputs: list[str]
    out: Path
    model: str | None = None
    backend: str = "auto"
    device: str = "auto"
    precision: str | None = None
    tta: str | None = None
    crop_scales: str = "1"  # classifier crop sides relative to the bundle's; logits averaged over them
    folds: str = "all"
    batch_size: int = 8
    workers: int = 2
    max_file_size: int = DEFAULT_MAX_BYTES  # bytes; a larger input is an error row, never read (0: no limit)
    masks: Path | None = None
    annotate: Path | None = None
    crops: Path | None = None
    details: Path | None = None
    explain: Path | None = None
    guided: bool = False
    report: Path | None = None
    resume: bool = False
    overwrite: bool = False
    recursive: bool = True
    ray: str | None = None  # a Ray cluster address ("auto": ray.init()'s discovery); None: predict here
    ray_actors: int | None = None
    ray_cpus_per_actor: float | None = None
    screen: tuple[str, ...] = ()  # operating points such as "mel@0.90": score and 0/1 flag columns in the CSV

    def __post_init__(self):
        self.screen = tuple(self.screen)
        parse_screen(self.screen)  # a bad spec fails before anything is loaded
        self.out = Path(self.out)
        for name in ("masks", "annotate", "crops", "details", "explain", "report"):  # the Python API may pass strings
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.out.suffix.lower() != ".csv":
            raise UsageError(f"--out {self.out}: must be a .csv file")
        if self.details is None:
            self.details = self.out.with_name(f"{self.out.stem}_details.csv")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; choose one")
        if self.guided and self.explain is None:
            raise UsageError("--guided adds guided Grad-CAM to the --explain outputs: pass --explain DIR too")
        if self.ray is None and (self.ray_actors is not None or self.ray_cpus_per_actor is not None):
            raise UsageError("--ray-actors and --ray-cpus-per-actor size the Ray actor pool: pass --ray too")

    @property
    def manifest(self) -> Path:
        return self.out.with_name(f"{self.out.stem}_manifest.json")


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0  # already in the CSV (--resume)
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    startup: float = 0.0  # loading the bundle and building the backend
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    status: str = "running"
    flagged: dict[str, int] = field(default_factory=dict)  # --screen point -> images it flagged this run
    screening: list[str] = field(default_factory=list)  # one summary line per --screen point

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def rates(self) -> dict[str, float]:
        done = self.ok + self.failed
        rates = {stage: done / s for stage, s in self.seconds.items() if s > 0}
        if self.elapsed > 0:
            rates["end_to_end"] = done / self.elapsed
        if self.elapsed > self.startup > 0:
            rates["after_startup"] = done / (self.elapsed - self.startup)
        return rates


def _resume_state(options: RunOptions, columns: tuple[str, ...]) -> tuple[set[str], list[dict], list[dict]]:
    """Images already done, and the rows of both CSVs to keep (details only for done images)."""
    if not options.out.exists():
        return set(), [], []
    if not options.resume:
        if not options.overwrite:
            raise UsageError(f"{options.out} exists; pass --resume to continue that run or --overwrite to replace it")
        return set(), [], []
    results = read_complete_rows(options.out)
    if results and list(results[0].keys()) != list(columns):
        raise UsageError(f"{options.out}: columns are {','.join(results[0])}, this run writes {','.join(columns)}; "
                         "resume with the --screen options of the first run, or start a new --out")
    done = {row["image"] for row in results}
    details = read_complete_rows(options.details) if options.details.exists() else []
    latest = {row["image"]: row for row in details if row.get("image") in done}  # last row per image wins
    return done, results, list(latest.values())


def run(options: RunOptions, on_start: Callable[[int], None] | None = None,
        on_result: Callable[[Result], None] | None = None, first_use=None) -> RunSummary:
    """Process every input image and stream the outputs; return the counts (exit code 3 if any failed).

    ``first_use``: the hook that may build an engine for the installed default bundle (the CLI passes it in)."""
    start = time.perf_counter()
    items = discover_inputs(options.inputs, recursive=options.recursive)
    summary = RunSummary(total=len(items))
    bundle = load_bundle(options.model)  # checked before the backend is built: a bad --screen fails at once
    points = select_points(options.screen, bundle.screening, bundle.path)
    columns = (*RESULT_COLUMNS, *result_columns(points))
    with RunLock(options.out):
        pending, keep_results, keep_details = _pending(options, items, summary, columns)
        load_start = time.perf_counter()
        with _predictor(options, first_use) as predictor:
            explainer = _explainer(options, predictor)
            summary.startup = time.perf_counter() - load_start
            writer = OutputWriter(CsvAppender(options.out, columns, keep_results),
                                  CsvAppender(options.details, DETAIL_COLUMNS, keep_details),
                                  masks=options.masks, annotate=options.annotate, crops=options.crops,
                                  explain=options.explain, report=options.report)
            summary.outputs = _output_paths(options)
            write_manifest(options, predictor, summary)
            if on_start:
                on_start(len(pending))
            _stream(options, predictor, explainer, writer, pending, summary, on_result, start, points)
            if options.report is not None:
                write_run_report(options, predictor, summary, points)
    return summary


def _pending(options: RunOptions, items: list[InputImage], summary: RunSummary, columns: tuple[str, ...]):
    """The images still to do, and the rows of both CSVs to keep (``--resume``)."""
    done, keep_results, keep_details = _resume_state(options, columns)
    pending = [i for i in items if i.image_id not in done]
    summary.skipped = len(items) - len(pending)
    if summary.skipped:
        log.info("resume: %d of %d images already in %s", summary.skipped, len(items), options.out)
    return pending, keep_results, keep_details


def _predictor(options: RunOptions, first_use) -> Predictor:
    """A Predictor here, or (``--ray``) one per actor of a Ray Data pool, behind the same interface."""
    knobs = {"backend": options.backend, "device": options.device, "tta": options.tta,
             "crop_scales": options.crop_scales, "folds": options.folds,
             "batch_size": options.batch_size, "workers": options.workers, "precision": options.precision,
             "max_bytes": options.max_file_size, "first_use": first_use}
    if options.ray is None:
        return Predictor(options.model, **knobs)
    from dermbatch.cluster import ClusterOptions, RayPredictor  # Ray: only when asked for

    cluster = ClusterOptions(options.ray, options.ray_actors, options.ray_cpus_per_actor, _arrays_needed(options))
    return RayPredictor(cluster, model=options.model, **knobs)


def _arrays_needed(options: RunOptions) -> frozenset[str]:
    """Which of a result's image arrays the requested outputs read (the rest need not leave the Ray actors)."""
    wanted = {"mask": (options.masks, options.annotate, options.report),
              "image": (options.annotate, options.report),
              "crop": (options.crops, options.explain, options.report)}
    return frozenset(name for name, outputs in wanted.items() if any(o is not None for o in outputs))


def _explainer(options: RunOptions, predictor: Predictor):
    if options.explain is None:
        return None
    from dermbatch.explain import Explainer  # torch: only when explanations are asked for

    return Explainer(predictor.bundle, predictor.folds["classification"], options.device, options.guided,
                     predictor.describe()["backend"])


def _output_paths(options: RunOptions) -> dict[str, str]:
    report_page = options.report / "index.html" if options.report is not None else None
    return {k: str(v) for k, v in (("results", options.out), ("details", options.details),
            ("masks", options.masks), ("annotate", options.annotate), ("crops", options.crops),
            ("explain", options.explain), ("report", report_page), ("manifest", options.manifest)) if v is not None}


def _stream(options: RunOptions, predictor: Predictor, explainer, writer: OutputWriter,
            pending: list[InputImage], summary: RunSummary, on_result, start: float,
            points: tuple[OperatingPoint, ...] = ()) -> None:
    """Predict, explain and hand each batch to the writer as it comes; close the writer and record the
    counts and stage times in the manifest whatever happens (an interrupted run keeps what it wrote)."""
    explain_seconds = 0.0
    try:
        for batch in batched(predictor.predict(pending), options.batch_size):
            for result in batch if points else ():
                if result.ok:
                    result.screening = screen_values(result.probabilities, predictor.bundle.classes, points)
            if explainer is not None:
                explain_start = time.perf_counter()
                explainer.explain(batch)
                explain_seconds += time.perf_counter() - explain_start
            writer.submit(batch)
            for result in batch:
                summary.ok += result.ok
                summary.failed += not result.ok
                if on_result:
                    on_result(result)
        summary.status = "finished"
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    finally:
        try:
            writer.close()
        finally:
            summary.ok -= writer.write_failures  # counted as done when predicted, then their files failed
            summary.failed += writer.write_failures
            _count_flags(summary, points, writer.flagged)
            summary.elapsed = time.perf_counter() - start
            summary.seconds = {**predictor.seconds, "write": writer.seconds}
            if explainer is not None:
                summary.seconds["explain"] = explain_seconds
            if summary.status == "running":
                summary.status = "failed"
            write_manifest(options, predictor, summary)


def _count_flags(summary: RunSummary, points: tuple[OperatingPoint, ...], flagged: dict[str, int]) -> None:
    """The ``--screen`` counts of the images written this run, and their summary lines."""
    done = summary.ok
    summary.flagged = {p.name: flagged.get(p.column, 0) for p in points}
    summary.screening = [summary_line(p, flagged.get(p.column, 0), done) for p in points]


def write_run_report(options: RunOptions, predictor: Predictor, summary: RunSummary,
                     points: tuple[OperatingPoint, ...] = ()) -> None:
    meta = {"bundle": predictor.bundle.name, "backend": predictor.describe()["backend"],
            "results": options.out.name, "run time": f"{summary.elapsed:.0f} s"}
    try:
        write_report(options.report, options.out, options.details, predictor.bundle.classes, meta, points)
    except OSError as exc:
        raise OutputError(f"{options.report}: cannot write the report ({exc.strerror or exc})") from None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "dermbatch": __version__}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(options: RunOptions, predictor: Predictor, summary: RunSummary) -> None:
    """The resolved configuration and counts of this run, beside the CSV (rewritten at the end)."""
    options_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    manifest = {
        "dermbatch_run": 1,
        "command": sys.argv if len(sys.argv) <= 64 else [*sys.argv[:32], f"… {len(sys.argv) - 32} more arguments"],
        "options": options_dict,
        "bundle": {"name": predictor.bundle.name, "path": str(predictor.bundle.path.resolve()),
                   "weights_sha256": predictor.bundle.hashes()},
        "runtime": predictor.describe(),
        "platform": {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor()},
        "versions": package_versions(),
        "summary": {**{k: v for k, v in asdict(summary).items() if k != "seconds"},
                    "stage_seconds": summary.seconds, "images_per_second": summary.rates()},
    }
    try:
        write_bytes_atomic(options.manifest, (json.dumps(manifest, indent=2, default=str) + "\n").encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"{options.manifest}: cannot write run manifest ({exc.strerror or exc})") from None
