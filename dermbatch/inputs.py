"""Finding the input images: files and folders, recursive by default, sorted, id = file stem."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dermbatch.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class InputImage:
    image_id: str
    path: Path


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path, recursive: bool) -> Iterable[Path]:
    """Image files under ``root``; follows symlinked folders once each, so a link loop ends."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen:
            log.warning("%s: folder already visited through another link; skipped (symlink loop?)", dirpath)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            if is_image_name(name):
                yield Path(dirpath) / name


def _walk_error(exc: OSError) -> None:
    log.warning("%s: cannot list folder (%s); skipped", exc.filename, exc.strerror)


def discover_inputs(paths: Iterable[str | os.PathLike], recursive: bool = True) -> list[InputImage]:
    """Expand files and folders into a sorted list of images with unique ids.

    Raises UsageError for a path that does not exist, a file that is not an image, two images with the
    same id (naming both), or no image at all.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(_walk(path, recursive))
        elif os.path.lexists(path):  # a FIFO, device or broken link too: reading it gives the row's reason
            if os.path.splitext(path.name)[1].lower() not in IMAGE_EXTENSIONS:
                raise UsageError(f"{path}: not an image file name (expected one of "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    found = sorted(set(found))
    by_id: dict[str, Path] = {}
    for path in found:
        image_id = path.stem
        if image_id in by_id:
            raise UsageError(f"two inputs have the image id {image_id!r}: {by_id[image_id]} and {path}; "
                             "rename one (ids are file names without extension and must be unique)")
        by_id[image_id] = path
    if not by_id:
        raise UsageError(f"no images found in {', '.join(map(str, paths))} "
                         f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [InputImage(image_id, path) for image_id, path in by_id.items()]
