"""Image ids as file names and as text: any id gets a safe output stem, and prints on one line.

Image ids come from input file names, and those may be up to 255 bytes long, hold backslashes, newlines,
quotes or commas, or be bytes that are not UTF-8 (Python keeps such bytes as lone surrogates, PEP 383).
``output_stem`` keeps an id that is safe as it is; any other id becomes a readable prefix plus a hash of the
whole id, short enough for every suffix dermbatch adds (temporary files included). The two forms cannot
meet: a kept id never has the ``~<16 hex>`` ending that every hashed stem has, so two inputs never share
an output file.
"""

from __future__ import annotations

import hashlib
import re

NAME_MAX = 255  # bytes in one file name on the file systems dermbatch writes to (ext4, XFS, APFS, NTFS)
# the longest ending dermbatch adds to a stem: "_guided_gradcam.jpg" plus the temporary form ".<name>.tmp"
LONGEST_ADDITION = len(".") + len("_guided_gradcam.jpg") + len(".tmp") + 12  # 12 bytes to spare
MAX_STEM_BYTES = NAME_MAX - LONGEST_ADDITION
HASH_CHARS = 16
_HASHED = re.compile(rf"~[0-9a-f]{{{HASH_CHARS}}}$")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|\udc80-\udcff]')  # also refused by Windows or SMB shares


def to_bytes(text: str) -> bytes:
    """The bytes of a file name as the file system holds them (lone surrogates back to their bytes)."""
    return text.encode("utf-8", "surrogateescape")


def is_safe_stem(image_id: str) -> bool:
    """True when ``image_id`` can name output files unchanged on any common file system."""
    return (bool(image_id) and not image_id.startswith(".") and not image_id.endswith((" ", "."))
            and _UNSAFE.search(image_id) is None and len(to_bytes(image_id)) <= MAX_STEM_BYTES
            and _HASHED.search(image_id) is None and image_id.isprintable())


def output_stem(image_id: str) -> str:
    """The stem of ``image_id``'s output files: the id itself when safe, else ``<readable prefix>~<hash>``."""
    if is_safe_stem(image_id):
        return image_id
    digest = hashlib.sha256(to_bytes(image_id)).hexdigest()[:HASH_CHARS]
    readable = "".join(c if c.isprintable() and not _UNSAFE.match(c) else "_" for c in image_id).strip(" .-")
    prefix = readable.encode("utf-8")[: MAX_STEM_BYTES - HASH_CHARS - 1].decode("utf-8", "ignore")
    return f"{prefix}~{digest}"


def printable(text: str) -> str:
    """``text`` on one line: control characters escaped, bytes that were not UTF-8 shown as ``\\xNN``."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable() or char == " ":
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)
