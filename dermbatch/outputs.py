"""Output files: streaming CSVs that survive interruption, a run lock, and safe output paths.

Rows are written a batch at a time with one ``write`` followed by flush + fsync, so an interrupted run
leaves at most one partial last row, which ``--resume`` cuts off before appending.

The CSVs are UTF-8. An image id from a file name that is not valid UTF-8 is written byte for byte, as the
file system holds the name (``surrogateescape``), so the row reads back to the same id and names the same
file: ``open(path, encoding="utf-8", errors="surrogateescape")`` in Python.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable
from pathlib import Path

from dermbatch.bundle import CLASSES
from dermbatch.errors import OutputError
from dermbatch.names import output_stem

RESULT_COLUMNS = ("image", *CLASSES)
DETAIL_COLUMNS = ("image", "path", "prediction", "confidence", "lesion_found", "bbox_x", "bbox_y", "bbox_w",
                  "bbox_h", "lesion_area_fraction", "lesion_probability", "mask_quality", "status", "error",
                  "output_stem")
ENCODING, ERRORS = "utf-8", "surrogateescape"  # how both CSVs are written and read
_QUOTED = re.compile(r'[,"\r\n]')


def format_rows(rows: Iterable[Iterable]) -> str:
    """CSV text, one ``\\n``-ended line per row; a field holding a comma, a quote, ``\\n`` or ``\\r`` is quoted
    (Python's csv writer leaves a lone ``\\r`` unquoted when the line ends in ``\\n``, and reads it back as a
    line end)."""
    return "".join(",".join(_field(value) for value in row) + "\n" for row in rows)


def _field(value) -> str:
    text = "" if value is None else str(value)
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if _QUOTED.search(text) else text


def read_complete_rows(path: Path) -> list[dict[str, str]]:
    """Rows of an existing CSV, ignoring a partial last row left by an interrupted write (cut anywhere, even
    inside a quoted id that holds a newline)."""
    data = path.read_bytes()
    reader = csv.reader(io.StringIO(data[: data.rfind(b"\n") + 1].decode(ENCODING, ERRORS), newline=""), strict=True)
    rows: list[list[str]] = []
    try:
        rows.extend(reader)
    except csv.Error as exc:  # only a cut inside a quoted last field is expected: nothing may follow it
        if next(reader, None) is not None:
            raise OutputError(f"{path}: cannot resume from this file (line {reader.line_num}: {exc})") from None
    if not rows:
        return []
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[1:] if len(row) == len(header)]


class CsvAppender:
    """A CSV written as header + ``keep`` rows (atomically), then appended to a batch at a time."""

    def __init__(self, path: Path, columns: tuple[str, ...], keep: Iterable[dict[str, str]] = ()):
        self.path = Path(path)
        self.columns = columns
        text = format_rows([columns, *([row.get(c, "") for c in columns] for row in keep)])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, text.encode(ENCODING, ERRORS))
            self._fh = open(self.path, "a", encoding=ENCODING, errors=ERRORS, newline="")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, rows: list[list]) -> None:
        if not rows:
            return
        try:
            self._write(format_rows(rows))
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc}); "
                              "rows written before this batch are intact") from None

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


class RunLock:
    """An exclusive lock on ``<out>.lock`` so two runs never interleave rows in the same CSV."""

    def __init__(self, out: Path):
        self.path = Path(str(out) + ".lock")
        self._fh = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; document rather than pretend
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w")
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise OutputError(f"{self.path.with_suffix('')}: another dermbatch run is writing it "
                              f"(lock {self.path}); wait for it to finish or choose another --out") from None
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create lock file ({exc.strerror or exc})") from None
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            self._fh.close()


def output_path(folder: Path, image_id: str, suffix: str) -> Path:
    """``folder/<stem><suffix>``: the stem is the id when it is a safe file name, else a safe stand-in
    (``dermbatch.names.output_stem``, recorded in the details CSV)."""
    return folder / f"{output_stem(image_id)}{suffix}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def result_row(result) -> list:
    """``image,MEL,...,VASC`` (ISIC 2018 Task 3 submission format), then the ``--screen`` columns if any."""
    return [result.image_id, *(f"{p:.6f}" for p in result.probabilities), *result.screening.values()]


def detail_row(result) -> list:
    box = result.bbox or ("", "", "", "")
    if not result.ok:
        return [result.image_id, str(result.path), "", "", "", "", "", "", "", "", "", "", "error", result.error, ""]
    return [result.image_id, str(result.path), result.label, f"{result.confidence:.6f}",
            str(result.lesion_found).lower(), *box, f"{result.area_fraction:.6f}",
            *("" if p is None else f"{p:.4f}" for p in (result.lesion_probability, result.mask_quality)), "ok", "",
            output_stem(result.image_id)]
