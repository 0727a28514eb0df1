"""`run --report` and `evaluate`'s report: contents from the CSVs, and both pages rendered in headless Chromium."""

import csv
import json
import re
import shutil

import numpy as np
import pytest

from dermbatch.bundle import CLASSES
from dermbatch.cli.main import main
from dermbatch.report import report_entries, write_report
from tests.conftest import HAM, ham_per_class, real_images


def _write_csv(path, columns, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


def _details(image, status="ok", prediction="NV", confidence="0.9", lesion="true", error=""):
    return {"image": image, "path": f"/data/{image}.jpg", "prediction": prediction, "confidence": confidence,
            "lesion_found": lesion, "status": status, "error": error}


def _probs(image, values):
    return {"image": image, **{c: f"{v:.6f}" for c, v in zip(CLASSES, values, strict=True)}}


@pytest.fixture
def csvs(tmp_path):
    results, details = tmp_path / "r.csv", tmp_path / "r_details.csv"
    _write_csv(results, ["image", *CLASSES], [_probs("a", [0.1, 0.6, 0.05, 0.05, 0.15, 0.03, 0.02]),
                                              _probs("b", [0.3, 0.25, 0.2, 0.1, 0.1, 0.03, 0.02])])
    _write_csv(details, ["image", "path", "prediction", "confidence", "lesion_found", "status", "error"],
               [_details("a", status="error", error="was bad first"), _details("a"),  # resumed: the last row wins
                _details("b", prediction="MEL", confidence="0.3", lesion="false"),
                _details("c", status="error", prediction="", confidence="", lesion="",
                         error="not an image </script><script>alert(1)</script>")])
    return results, details


def test_entries_take_the_last_row_sorted_top3_and_existing_thumbnails(csvs, tmp_path):
    results, details = csvs
    (tmp_path / "rep" / "thumbs").mkdir(parents=True)
    (tmp_path / "rep" / "thumbs" / "a_annotated.jpg").write_bytes(b"x")
    entries = {e["id"]: e for e in report_entries(tmp_path / "rep", results, details, CLASSES)}
    assert list(entries) == ["a", "b", "c"]
    assert entries["a"]["error"] == "" and entries["a"]["pred"] == "NV" and entries["a"]["conf"] == 0.6
    assert entries["a"]["top"] == [["NV", 0.6], ["BKL", 0.15], ["MEL", 0.1]]
    assert entries["a"]["thumbs"] == {"annotated": "thumbs/a_annotated.jpg"}
    assert entries["b"]["lesion"] is False and entries["b"]["thumbs"] == {}
    assert "pred" not in entries["c"] and entries["c"]["error"].startswith("not an image")


def test_page_embeds_the_data_without_closing_its_script(csvs, tmp_path):
    results, details = csvs
    page = write_report(tmp_path / "rep", results, details, CLASSES, {"bundle": "x<y"}).read_text()
    assert "<script>alert(1)" not in page and "x&lt;y" in page
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["images"][2]["error"].endswith("</script><script>alert(1)</script>")


def test_report_of_a_real_run_renders_in_chromium(tiny_bundle, browser, tmp_path):
    images = real_images(HAM, 12)
    (tmp_path / "in").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).symlink_to(image)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle.path),
                 "--report", str(tmp_path / "rep"), "--explain", str(tmp_path / "cam"), "-q"])
    assert code == 3  # one image failed, the others are reported
    errors = browser.open(tmp_path / "rep" / "index.html")
    assert errors == []
    assert browser.js("return document.querySelectorAll('#gallery .card').length") == 13
    assert browser.js("return document.querySelectorAll('#gallery .card.error').length") == 1
    loaded, shown = browser.load_images("#gallery img")  # lazy ones below the fold: scrolled to, then waited for
    assert shown >= 12 and loaded == shown
    # filtering by class shows exactly the images predicted as that class
    predicted = [r["prediction"] for r in csv.DictReader(open(tmp_path / "r_details.csv")) if r["status"] == "ok"]
    top = max(set(predicted), key=predicted.count)
    shown = browser.js(f"const s = document.getElementById('f-class'); s.value = '{top}';"
                       "s.dispatchEvent(new Event('input')); return document.querySelectorAll('#gallery .card').length")
    assert shown == predicted.count(top)
    browser.js("const s = document.getElementById('f-class'); s.value = ''; s.dispatchEvent(new Event('input'));")
    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.shape[0] > 500 and shot.std() > 20  # a rendered page with pictures, not a blank one


def test_report_stays_paginated_for_ten_thousand_images(browser, tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=10_000)
    ids = [f"ISIC_{i:07d}" for i in range(10_000)]
    _write_csv(tmp_path / "r.csv", ["image", *CLASSES], [_probs(i, p) for i, p in zip(ids, probs, strict=True)])
    _write_csv(tmp_path / "r_details.csv", ["image", "path", "prediction", "confidence", "lesion_found", "status",
                                            "error"], [_details(i) for i in ids])
    page = write_report(tmp_path / "rep", tmp_path / "r.csv", tmp_path / "r_details.csv", CLASSES, {})
    assert browser.open(page) == []
    assert browser.js("return document.querySelectorAll('#gallery .card').length") == 60
    assert browser.js("return document.getElementById('page').textContent") == "page 1 of 167 (10000 images)"
    low = browser.js("const s = document.getElementById('f-flag'); s.value = 'low';"
                     "s.dispatchEvent(new Event('input')); return document.getElementById('page').textContent")
    assert low.endswith(f"({int((probs.max(1) < 0.5).sum())} images)")


@pytest.mark.realdata
def test_evaluation_report_renders_in_chromium(tiny_bundle, browser, tmp_path):
    ids, labels = ham_per_class(tmp_path / "in", 2)
    labels.loc[ids].reset_index()[["image_id", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    shutil.copytree(HAM / "masks", tmp_path / "masks", ignore=lambda d, names: [
        n for n in names if n.split("_segmentation")[0] not in ids])
    assert main(["evaluate", "--images", str(tmp_path / "in"), "--masks", str(tmp_path / "masks"), "--labels",
                 str(tmp_path / "labels.csv"), "--model", str(tiny_bundle.path), "--out", str(tmp_path / "ev")]) == 0
    out = tmp_path / "ev"
    for name in ("confusion_matrix.png", "roc.png", "calibration.png", "segmentation_failures.png"):
        assert (out / name).stat().st_size > 5000
    assert list(out.glob("confused_*_as_*.png"))
    assert browser.open(out / "report.html") == []
    assert browser.js("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.js("return document.images.length") >= 5
    assert browser.screenshot(tmp_path / "evaluation.png").std() > 20
