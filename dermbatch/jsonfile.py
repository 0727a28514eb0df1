"""Reading a JSON file that may be hostile (``bundle.json``, ``engine.json``): bounded in size and nesting.

A bundle or an engine folder may come from anywhere. The file's size is checked before it is read and its
nesting depth before it is parsed, so a huge or deeply nested file is one line naming the file and the limit,
never a ``MemoryError`` or a ``RecursionError`` from the parser.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MAX_JSON_BYTES = 16 << 20  # the default bundle's bundle.json is 15 kB
MAX_JSON_DEPTH = 64  # it nests 6 deep
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings not counted)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match[0] in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json(path: Path, error: type[Exception], what: str, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """The parsed content of ``path``; ``error(message)`` naming the file and the reason when it is too large,
    too deeply nested, not UTF-8 or not JSON. A missing file raises FileNotFoundError for the caller to word."""
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise error(f"{path}: {what} is {size:,} bytes, over the {max_bytes:,}-byte limit; not read")
        with open(path, "rb") as fh:
            text = fh.read(max_bytes + 1).decode("utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None
    if len(text) > max_bytes:
        raise error(f"{path}: {what} grew past the {max_bytes:,}-byte limit while being read; not used")
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{path}: {what} nests {depth} levels deep, over the limit of {max_depth}; not parsed")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None
