"""Decoding one input image into RGB uint8, robustly: the header is checked before pixels are allocated.

* PIL reads only the header: format, size, EXIF orientation, so a decompression bomb is refused by its
  pixel count before anything is decoded.
* OpenCV decodes the pixels (grayscale, RGBA, palette and 16-bit all come out as 8-bit RGB); large JPEGs are
  decoded at 1/2, 1/4 or 1/8 scale by libjpeg when the result still has ``min_side`` pixels on its shorter
  side, which is more than the models look at.
* EXIF orientation is applied here, so masks and boxes are in the orientation a viewer shows.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dermbatch.errors import ImageError, UsageError

SUPPORTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF"}
DEFAULT_MAX_PIXELS = 150_000_000  # 12k x 12k; ISIC 2019/2020 photos are at most 6000x4000 (24 MP)
DEFAULT_MAX_BYTES = 512 << 20  # --max-file-size: a 24 MP lossless TIFF is 72 MB
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_ORIENT = {  # EXIF orientation -> (rotate code or None, flip horizontally first)
    2: (None, True), 3: (cv2.ROTATE_180, False), 4: (cv2.ROTATE_180, True),
    5: (cv2.ROTATE_90_COUNTERCLOCKWISE, True), 6: (cv2.ROTATE_90_CLOCKWISE, False),
    7: (cv2.ROTATE_90_CLOCKWISE, True), 8: (cv2.ROTATE_90_COUNTERCLOCKWISE, False),
}


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (h, w, 3) uint8 at working resolution
    original_size: tuple[int, int]  # (height, width) of the full image, after EXIF orientation
    scale: int  # 1, 2, 4 or 8: how much the working resolution was reduced at decode


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    orientation: int


def read_header(data: bytes, path: Path, max_pixels: int) -> ImageHeader:
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
            if fmt in SUPPORTED_FORMATS and width * height <= max_pixels:
                orientation = _orientation(im)
    except Image.DecompressionBombError:
        raise ImageError(path, f"image has more pixels than the {max_pixels // 1_000_000} MP limit "
                               "(possible decompression bomb); not decoded") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised content)") from None
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise ImageError(path, f"unreadable image header ({exc})") from None
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(path, f"content is {fmt}, not a supported format (JPEG, PNG, BMP, TIFF)")
    if width * height > max_pixels:
        raise ImageError(path, f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                               f"{max_pixels / 1e6:.0f} MP limit (possible decompression bomb); not decoded")
    if width < 1 or height < 1:
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    return ImageHeader(SUPPORTED_FORMATS[fmt], width, height, orientation)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, read without decoding pixels (PIL's PNG getexif() would decode them)."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    elif im.format in ("JPEG", "MPO", "TIFF"):
        exif = im.getexif()
    else:
        return 1
    value = exif.get(0x0112, 1)
    return value if value in range(1, 9) else 1


def reduction_factor(header: ImageHeader, min_side: int | None) -> int:
    """Largest libjpeg scale (1/2, 1/4, 1/8) keeping ``min_side`` pixels on the shorter side."""
    if header.format != "JPEG" or not min_side:
        return 1
    short = min(header.width, header.height)
    return next((f for f in (8, 4, 2) if short // f >= min_side), 1)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _check_regular(path: Path, status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise ImageError(path, f"not a regular file: {_kind(status.st_mode)}; not read")
    if max_bytes and status.st_size > max_bytes:
        raise ImageError(path, f"file is {format_size(status.st_size)}, over the --max-file-size limit of "
                               f"{format_size(max_bytes)}; not read")


def read_input(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of one input file, read only when it is a regular file of at most ``max_bytes`` (0: no limit).

    The name is checked with ``stat`` (so a FIFO, a device or a socket is never opened), then opened without
    blocking and checked again on the open descriptor, so a file swapped for something else between the
    listing and the read is caught; a file that grows past the limit while being read is refused too."""
    path = Path(path)
    try:
        _check_regular(path, os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        gone = "broken symbolic link (its target does not exist)" if os.path.islink(path) else \
            "file disappeared before it could be read"
        raise ImageError(path, gone) from None
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        status = os.fstat(fd)
        _check_regular(path, status, max_bytes)
        try:
            data = fh.read(max_bytes + 1 if max_bytes else -1)
        except OSError as exc:
            raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from None
    if max_bytes and len(data) > max_bytes:
        raise ImageError(path, f"file grew past the --max-file-size limit of {format_size(max_bytes)} while "
                               "being read; not used")
    return data


def format_size(size: int) -> str:
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def parse_size(text: str) -> int:
    """``--max-file-size``: bytes, or a number with k/M/G (powers of 1024), e.g. 512M or 2GB; 0 means no limit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", str(text))
    if match is None:
        raise UsageError(f"--max-file-size {text!r}: give a size such as 512M, 2G or 0 (no limit)")
    return int(float(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match[2].lower()])


def decode_image(path: str | Path, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedImage:
    """Read ``path`` into RGB uint8; raise ImageError naming the file and the reason."""
    path = Path(path)
    data = read_input(path, max_bytes)
    header = read_header(data, path, max_pixels)
    if header.format == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise ImageError(path, "truncated JPEG (no end-of-image marker)")
    factor = reduction_factor(header, min_side)
    flags = (_REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None or bgr.size == 0:
        raise ImageError(path, f"corrupt or truncated {header.format} data (decoder failed)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = apply_orientation(rgb, header.orientation)
    size = (header.height, header.width) if header.orientation < 5 else (header.width, header.height)
    return DecodedImage(rgb=rgb, original_size=size, scale=factor)


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into displayed pixels according to the EXIF orientation tag (1..8)."""
    if orientation not in _ORIENT:
        return image
    rotate, flip = _ORIENT[orientation]
    if flip:
        image = cv2.flip(image, 1)
    return cv2.rotate(image, rotate) if rotate is not None else np.ascontiguousarray(image)
