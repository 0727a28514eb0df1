"""Background decoding: worker threads (OpenCV releases the GIL) feeding a bounded, ordered queue.

A failure in a worker becomes an error result naming the image and the cause, never a hang or a lost
batch; ``workers=0`` decodes serially in the calling thread, for debugging.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from dermbatch.errors import ImageError
from dermbatch.imageio import DecodedImage
from dermbatch.inputs import InputImage

T = TypeVar("T")
DECODE_TIMEOUT_S = 300.0


@dataclass
class Sample:
    item: InputImage
    decoded: DecodedImage | None = None
    seg_input: np.ndarray | None = None  # (3, H, W) float32, ready for the segmenter
    error: str | None = None
    seconds: float = 0.0


def load_sample(item: InputImage, decode: Callable[[InputImage], tuple[DecodedImage, np.ndarray]]) -> Sample:
    start = time.perf_counter()
    try:
        decoded, seg_input = decode(item)
        return Sample(item, decoded, seg_input, seconds=time.perf_counter() - start)
    except ImageError as exc:
        return Sample(item, error=exc.reason, seconds=time.perf_counter() - start)
    except MemoryError:
        return Sample(item, error="out of memory while decoding", seconds=time.perf_counter() - start)
    except Exception as exc:  # a bug or a codec crash must cost one image, not the batch
        return Sample(item, error=f"unexpected {type(exc).__name__} while decoding: {exc}",
                      seconds=time.perf_counter() - start)


def iter_samples(items: Iterable[InputImage], decode: Callable, workers: int, depth: int) -> Iterator[Sample]:
    """Decode ``items`` in order, ``workers`` at a time, at most ``depth`` images ahead of the consumer."""
    if workers <= 0:
        for item in items:
            yield load_sample(item, decode)
        return
    pending: deque[tuple[InputImage, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dermbatch-decode") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(load_sample, item, decode)))
                if len(pending) >= depth:
                    yield _result(*pending.popleft())
            while pending:
                yield _result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()


def _result(item: InputImage, future: Future) -> Sample:
    try:
        return future.result(timeout=DECODE_TIMEOUT_S)
    except FutureTimeout:
        return Sample(item, error=f"decoding took longer than {DECODE_TIMEOUT_S:.0f} s; skipped")
    except Exception as exc:  # the worker itself failed (should not happen: load_sample catches)
        return Sample(item, error=f"decode worker failed: {type(exc).__name__}: {exc}")


def batched(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for value in iterable:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
