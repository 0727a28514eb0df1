"""Shared fixtures: a small randomly initialised bundle of real smp/timm models, and real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from dermbatch.bundle import IMAGENET_MEAN, IMAGENET_STD, CropSpec, ModelSpec

DATA = Path(os.environ.get("DERMBATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAM = DATA / "ham10000"
ISIC_SEG = DATA / "isic2018_task1"


def tiny_specs(folds=(0, 1), tta="flip"):
    seg = ModelSpec("segmentation", "unet", "tu-mobilenetv3_small_050", (64, 64), IMAGENET_MEAN, IMAGENET_STD,
                    tuple(folds), tta=tta, threshold=0.5)
    cls = ModelSpec("classification", "timm", "mobilenetv3_small_050", (64, 64), IMAGENET_MEAN, IMAGENET_STD,
                    tuple(folds), tta=tta)
    return seg, cls


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A 2-fold bundle of real (randomly initialised) smp U-Net and timm classifier models."""
    from dermbatch.models import create_random_bundle

    root = tmp_path_factory.mktemp("bundle")
    seg, cls = tiny_specs()
    return create_random_bundle(root, seg, cls, CropSpec(margin=0.1), name="tiny-test")


def shared_backbone_bundle(root, tuned_from: int | None = None):
    """A 2-fold multistage-classifier bundle whose backbone is stored once, as training with a frozen one does;
    with ``tuned_from=K`` each fold has its own block stages K.. and head convolution, as ``--tune-stages K``."""
    import torch

    from dermbatch.bundle import CLASSES, build_manifest, load_bundle, save_weights, write_manifest
    from dermbatch.models import build_model

    spec = ModelSpec("classification", "timm-multistage", "test_efficientnet", (64, 64), (0.5,) * 3, (0.5,) * 3,
                     (0, 1))
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    own = tuple(f"backbone.blocks.{k}." for k in range(tuned_from, 99)) + ("backbone.conv_head.", "backbone.bn2.") \
        if tuned_from is not None else ()
    weights = dict([save_weights(root, "classification", None,
                                 {k: v for k, v in state.items() if not k.startswith(("classifier.", *own))})])
    for fold in spec.folds:
        head = {"classifier.weight": torch.randn(len(CLASSES), state["classifier.weight"].shape[1]),
                "classifier.bias": torch.randn(len(CLASSES))}
        head |= {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in state.items() if k.startswith(own)}
        weights.update([save_weights(root, "classification", fold, head)])
    write_manifest(root, build_manifest(None, spec, CropSpec(), weights, "shared"))
    return load_bundle(root), state


def synthetic_lesion(path: Path, size=(150, 200), seed=0, center=None, radius=None) -> np.ndarray:
    """Write a skin-coloured image with one dark elliptical 'lesion'; return its true mask (0/1)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (170, 130, 190)  # BGR skin tone
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cy, cx = center or (h // 2, w // 2)
    ry, rx = radius or (h // 5, w // 6)
    cv2.ellipse(mask, (cx, cy), (rx, ry), 15, 0, 360, 1, -1)
    image[mask > 0] = (60, 40, 90)
    cv2.imwrite(str(path), image)
    return mask


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        synthetic_lesion(folder / f"img_{i}.jpg", seed=i)
    synthetic_lesion(folder / "img_5.PNG", seed=5)
    return folder


def real_images(dataset: Path, count: int) -> list[Path]:
    if not (dataset / "images").is_dir():
        pytest.skip(f"real data not present at {dataset}")
    return sorted((dataset / "images").glob("*.jpg"))[:count]


def ham_per_class(folder: Path, per_class: int):
    """Symlink the first ``per_class`` HAM10000 images of each class into ``folder``; return (ids, labels frame
    indexed by image_id). Skips when the data are absent."""
    import pandas as pd

    from dermbatch.bundle import CLASSES

    real_images(HAM, 1)
    labels = pd.read_csv(HAM / "labels.csv").set_index("image_id")
    ids = [i for c in CLASSES for i in labels.index[labels["label"] == c][:per_class]]
    folder.mkdir()
    for image_id in ids:
        (folder / f"{image_id}.jpg").symlink_to(HAM / "images" / f"{image_id}.jpg")
    return ids, labels


class Browser:
    """Headless Chromium through Selenium: load a local page, read its console, take screenshots."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, path: Path) -> list[dict]:
        """Load ``path``; return the console messages of level SEVERE (errors) it produced."""
        self.driver.get(path.resolve().as_uri())
        return [m for m in self.driver.get_log("browser") if m["level"] == "SEVERE"]

    def js(self, script: str):
        return self.driver.execute_script(script)

    def load_images(self, selector: str, timeout: float = 20.0) -> tuple[int, int]:
        """Load every image matching ``selector`` now (``loading="lazy"`` ones below the fold wait for a scroll
        otherwise) and wait until each has finished; return (decoded to a picture, all)."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.js(f"document.querySelectorAll({selector!r}).forEach(i => {{ i.loading = 'eager'; }})")
        WebDriverWait(self.driver, timeout).until(
            lambda d: d.execute_script(f"return [...document.querySelectorAll({selector!r})].every(i => i.complete)"))
        return (self.js(f"return [...document.querySelectorAll({selector!r})].filter(i => i.naturalWidth > 0).length"),
                self.js(f"return document.querySelectorAll({selector!r}).length"))

    def screenshot(self, path: Path) -> np.ndarray:
        self.driver.save_screenshot(str(path))
        return cv2.imread(str(path))


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian packages chromium and chromium-driver; .ci/run installs them)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
