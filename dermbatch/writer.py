"""The background writer: per batch, image files first, then details rows, then result rows.

That order keeps the outputs consistent after an interruption: a row in the results CSV means its mask and
annotation are complete, and ``--resume`` redoes anything whose result row is missing.

One image whose files cannot be written (a name the file system refuses, a folder in the way, an encoder
failure) becomes that image's error row, its partial files removed; only what stops every later write too
(a full disk, a read-only or vanished output folder, a file-size limit) stops the run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
import time
from pathlib import Path

import cv2

from dermbatch.annotate import draw_annotation
from dermbatch.errors import OutputError
from dermbatch.heatmap import enlarge, heatmap_figure
from dermbatch.names import printable
from dermbatch.outputs import CsvAppender, detail_row, output_path, result_row, write_bytes_atomic
from dermbatch.report import thumb_path, thumbnails
from dermbatch.result import Result

log = logging.getLogger(__name__)
_STOP = object()
# errors that every later write would meet too: the run stops (with one line) instead of failing each image
FATAL_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EACCES", "EPERM",
                                                           "EIO", "ENOENT", "ENOTDIR") if hasattr(errno, name))


class OutputWriter:
    def __init__(self, results: CsvAppender, details: CsvAppender, masks: Path | None = None,
                 annotate: Path | None = None, crops: Path | None = None, explain: Path | None = None,
                 report: Path | None = None):
        self.results, self.details = results, details
        self.report = report
        self.folders = {"masks": masks, "annotate": annotate, "crops": crops, "explain": explain,
                        "report": report / "thumbs" if report is not None else None}
        for name, folder in self.folders.items():
            if folder is not None:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    for stale in folder.glob(".*.tmp"):  # left by a run killed mid-write
                        stale.unlink()
                except OSError as exc:
                    raise OutputError(f"{folder}: cannot create --{name} folder ({exc.strerror or exc})") from None
        self.seconds = 0.0
        self.write_failures = 0  # images turned into error rows because their files could not be written
        self.flagged: dict[str, int] = {}  # --screen flag column -> images written with it set
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._loop, name="dermbatch-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: list[Result]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write everything submitted so far, stop the thread, raise the first write error if any."""
        if self._thread.is_alive():
            while self._thread.is_alive():
                try:
                    self._queue.put(_STOP, timeout=0.5)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self.results.close()
        self.details.close()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            start = time.perf_counter()
            try:
                self.write_batch(batch)
            except OutputError as exc:
                self.error = exc
            except OSError as exc:
                self.error = OutputError(f"{exc.filename or 'output'}: cannot write ({exc.strerror or exc}); "
                                         "stopping, rows already in the CSV are intact")
            except Exception as exc:  # keep the main thread informed instead of dying silently
                self.error = OutputError(f"writing outputs failed: {type(exc).__name__}: {exc}")
            self.seconds += time.perf_counter() - start

    def write_batch(self, batch: list[Result]) -> None:
        for result in batch:
            if result.ok:
                self._write_or_fail(result)
        self.details.append([detail_row(r) for r in batch])
        self.results.append([result_row(r) for r in batch if r.ok])
        for column in (c for r in batch if r.ok for c in r.suspicious):
            self.flagged[column] = self.flagged.get(column, 0) + 1

    def _write_or_fail(self, result: Result) -> None:
        """Write one result's image files; a failure that concerns this image alone makes it an error row."""
        written: list[Path] = []
        try:
            for path, make in self._image_files(result):
                _write_image(path, make())
                written.append(path)
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:
                raise
            reason = f"cannot write its outputs ({exc.strerror or exc})"
        except (OutputError, cv2.error, ValueError) as exc:
            reason = f"cannot write its outputs ({exc})"
        else:
            return
        for path in written:  # a row-less image keeps no half set of files
            with contextlib.suppress(OSError):
                path.unlink()
        result.error, result.probabilities = reason, None
        self.write_failures += 1
        log.warning("skipped %s: %s", printable(str(result.path)), reason)

    def _image_files(self, result: Result):
        """(path, function making the BGR/gray image) for each file the requested outputs need."""
        masks, annotate, crops = self.folders["masks"], self.folders["annotate"], self.folders["crops"]
        explain, image_id = self.folders["explain"], result.image_id
        if masks is not None:
            yield output_path(masks, image_id, "_segmentation.png"), result.full_size_mask
        if annotate is not None:
            note = ("no lesion found: whole image classified" if not result.lesion_found
                    else f"unreliable mask (quality {result.mask_quality:.2f})" if result.unreliable_mask else None)
            yield output_path(annotate, image_id, "_annotated.jpg"), lambda: draw_annotation(
                result.image, result.mask, result.crop_box, result.top(3), note, result.alert)
        if crops is not None:
            yield output_path(crops, image_id, "_crop.png"), lambda: cv2.cvtColor(result.crop, cv2.COLOR_RGB2BGR)
        if explain is not None and result.heatmap is not None:
            yield output_path(explain, image_id, "_gradcam.jpg"), lambda: heatmap_figure(
                result.crop, result.heatmap, f"{result.label} {result.confidence:.1%}")
        if explain is not None and result.guided is not None:
            yield output_path(explain, image_id, "_guided_gradcam.jpg"), lambda: enlarge(
                cv2.cvtColor(result.guided, cv2.COLOR_RGB2BGR))
        if self.report is not None:
            for kind, image in thumbnails(result).items():
                yield thumb_path(self.report, image_id, kind), lambda image=image: image


def _write_image(path: Path, image) -> None:
    ok, encoded = cv2.imencode(path.suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix == ".jpg" else [])
    if not ok:
        raise OutputError(f"{path}: image encoding failed")
    try:
        write_bytes_atomic(path, encoded.tobytes())
    except OSError:
        with contextlib.suppress(OSError):
            path.with_name(f".{path.name}.tmp").unlink()
        raise
