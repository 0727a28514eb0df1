"""The engine-folder contract shared by the runtimes (``dermbatch.backends``) and the builders (``engines/``):
where compiled engines live, ``engine.json``, the bundle fingerprint and the mismatch check, and the names of
the graphs' input and output tensors.

``<bundle>/engines/<key>/`` (or, for a read-only bundle such as the installed default, the per-user cache
``~/.cache/dermbatch/engines/<bundle fingerprint>/<key>/``), one folder per target and precision (TensorRT
keys also name the GPU and TensorRT version), so several coexist. ``engine.json`` records the fingerprint
of the bundle weights the engine was built from; an engine built from other weights is never used. It also
records the sha256 of every engine file, checked before an engine is used: a changed file (bit rot, a partial
copy, tampering) is refused with one line, or, in the first-use cache of the installed default bundle,
removed so that it is built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dermbatch.bundle import Bundle, sha256_file
from dermbatch.errors import BackendError
from dermbatch.jsonfile import read_json

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.json"
ENGINE_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
INPUT, OUTPUT = "images", "logits"  # every exported graph's one input and one output tensor


def fingerprint(bundle: Bundle) -> str:
    """sha256 over the bundle's weight hashes: changes whenever any weight file changes."""
    return hashlib.sha256(json.dumps(bundle.hashes(), sort_keys=True).encode()).hexdigest()


def engine_key(target: str, precision: str, device_tag: str | None = None) -> str:
    key = f"{target}-{precision}" + (f"-{device_tag}" if device_tag else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def engine_roots(bundle: Bundle) -> list[Path]:
    cache = Path(os.environ.get("DERMBATCH_CACHE", Path.home() / ".cache" / "dermbatch"))
    return [bundle.path / "engines", cache / "engines" / fingerprint(bundle)[:16]]


def writable_root(bundle: Bundle) -> Path:
    """The bundle's own engines folder when it can be written, else (and for the installed default bundle, which
    lives in the package) the per-user cache."""
    own, cache = engine_roots(bundle)
    if os.access(bundle.path, os.W_OK) and not bundle.is_installed_default:
        return own
    return cache


@contextmanager
def build_lock(bundle: Bundle) -> Iterator[None]:
    """Hold an exclusive lock on this bundle's engine root while building into it, so processes that share a
    cache (Ray actors on one node, two runs started together) build one after the other, never into one folder
    at once. Whoever waited should look again for the engine before building it (``find_engine``)."""
    root = writable_root(bundle)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a clash there costs a rebuild, not a corrupt engine
        yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / ".build.lock", "w")
    except OSError as exc:
        raise BackendError(f"{root}: cannot create the engine build lock ({exc.strerror or exc})") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def find_engine(bundle: Bundle, target: str, precision: str | None = None, device_tag: str | None = None):
    """(folder, engine.json) of a matching engine, preferring int8, then bf16, fp16, fp32; None when absent."""
    for wanted in ([precision] if precision else ["int8", "bf16", "fp16", "fp32"]):
        for root in engine_roots(bundle):
            folder = root / engine_key(target, wanted, device_tag)
            info = read_info(folder)
            if info is None:
                continue
            rebuild = f"dermbatch build-engine --model {bundle.path} --target {target} --precision {wanted}"
            if info.get("weights_fingerprint") != fingerprint(bundle):
                raise BackendError(f"{folder}: engine was built from other weights than {bundle.path}; rebuild it: "
                                   f"{rebuild}")
            changed = changed_file(folder, info)
            if changed is not None:
                raise BackendError(f"{changed}; not used. Rebuild it: {rebuild}")
            return folder, info
    return None


def purge_changed_cache(bundle: Bundle) -> list[Path]:
    """Remove the installed default bundle's first-use engines (in the per-user cache) whose files changed since
    they were built, one warning each, so that the first-use hook builds them again; return their folders."""
    cache = engine_roots(bundle)[1]
    if not bundle.is_installed_default or not cache.is_dir():
        return []
    removed = []
    for folder in sorted(p.parent for p in cache.glob(f"*/{ENGINE_FILE}")):
        try:
            changed = changed_file(folder, read_info(folder) or {})
        except BackendError as exc:  # an engine.json that cannot be read is as broken as a changed file
            changed = str(exc)
        if changed is not None:
            log.warning("%s; removing that cached engine so that it is built again", changed)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a run hashes each file once


def changed_file(folder: Path, info: dict) -> str | None:
    """Why an engine's files differ from what ``engine.json`` recorded at build time (a missing file, or a
    sha256 that changed), or None when every file is as built."""
    for task in info.get("tasks", {}).values():
        for name_key, hash_key in (("file", "sha256"), ("weights_file", "weights_sha256")):
            if name_key not in task:
                continue
            path = folder / task[name_key]
            try:
                status = path.stat()
            except OSError:
                return f"{path}: engine file is missing"
            key = (str(path), status.st_size, status.st_mtime_ns)
            if key not in _verified:
                _verified[key] = sha256_file(path)
            if task.get(hash_key) is None or _verified[key] != task[hash_key]:
                return f"{path}: engine file changed since it was built (its sha256 differs from {ENGINE_FILE})"
    return None


def require_engine(bundle: Bundle, target: str, precision: str | None = None) -> tuple[Path, dict]:
    """``find_engine``, or an error naming the command that builds the missing engine."""
    found = find_engine(bundle, target, precision)
    if found is None:
        wanted = precision or "fp32"
        raise BackendError(f"{bundle.path}: no {ENGINE_NAMES[target]} engine ({wanted}); build it with: dermbatch "
                           f"build-engine --model {bundle.path} --target {target} --precision {wanted}")
    return found


def read_info(folder: Path) -> dict | None:
    path = folder / ENGINE_FILE
    if not path.is_file():
        return None
    return read_json(path, BackendError, "engine description")


def write_info(folder: Path, info: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ENGINE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(folder / ENGINE_FILE)
    return folder / ENGINE_FILE

