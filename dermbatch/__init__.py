"""dermbatch: batch segmentation and classification of dermoscopic images.

Python API (mirrors ``dermbatch run``)::

    from dermbatch import Predictor
    predictor = Predictor("path/to/bundle", tta="flip")
    for result in predictor.predict(["img1.jpg", "img2.jpg"]):
        print(result.image_id, result.label, result.probabilities)
"""

from __future__ import annotations

__version__ = "0.1.0"

from dermbatch.bundle import CLASSES, Bundle, load_bundle
from dermbatch.errors import BackendError, BundleError, DermbatchError, ImageError, OutputError, UsageError
from dermbatch.predictor import Predictor
from dermbatch.result import Result

__all__ = [
    "CLASSES",
    "Bundle",
    "BackendError",
    "BundleError",
    "DermbatchError",
    "ImageError",
    "OutputError",
    "Predictor",
    "Result",
    "UsageError",
    "load_bundle",
    "__version__",
]
