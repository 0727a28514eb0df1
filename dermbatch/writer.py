"""The background writer: per batch, image files first, then details rows, then result rows.

That order keeps the outputs consistent after an interruption: a row in the results CSV means its mask and
annotation are complete, and ``--resume`` redoes anything whose result row is missing.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import cv2

from dermbatch.annotate import draw_annotation
from dermbatch.errors import OutputError
from dermbatch.heatmap import enlarge, heatmap_figure
from dermbatch.outputs import CsvAppender, detail_row, output_path, result_row, write_bytes_atomic
from dermbatch.report import thumb_path, thumbnails
from dermbatch.result import Result

_STOP = object()


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
                self._write_images(result)
        self.details.append([detail_row(r) for r in batch])
        self.results.append([result_row(r) for r in batch if r.ok])

    def _write_images(self, result: Result) -> None:
        masks, annotate, crops = self.folders["masks"], self.folders["annotate"], self.folders["crops"]
        if masks is not None:
            _write_image(output_path(masks, result.image_id, "_segmentation.png"), result.full_size_mask())
        if annotate is not None:
            note = ("no lesion found: whole image classified" if not result.lesion_found
                    else f"unreliable mask (quality {result.mask_quality:.2f})" if result.unreliable_mask else None)
            image = draw_annotation(result.image, result.mask, result.crop_box, result.top(3), note)
            _write_image(output_path(annotate, result.image_id, "_annotated.jpg"), image)
        if crops is not None:
            _write_image(output_path(crops, result.image_id, "_crop.png"), cv2.cvtColor(result.crop, cv2.COLOR_RGB2BGR))
        explain = self.folders["explain"]
        if explain is not None and result.heatmap is not None:
            _write_image(output_path(explain, result.image_id, "_gradcam.jpg"),
                         heatmap_figure(result.crop, result.heatmap, f"{result.label} {result.confidence:.1%}"))
        if explain is not None and result.guided is not None:
            _write_image(output_path(explain, result.image_id, "_guided_gradcam.jpg"),
                         enlarge(cv2.cvtColor(result.guided, cv2.COLOR_RGB2BGR)))
        if self.report is not None:
            for kind, image in thumbnails(result).items():
                _write_image(thumb_path(self.report, result.image_id, kind), image)


def _write_image(path: Path, image) -> None:
    ok, encoded = cv2.imencode(path.suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix == ".jpg" else [])
    if not ok:
        raise OutputError(f"{path}: image encoding failed")
    write_bytes_atomic(path, encoded.tobytes())
