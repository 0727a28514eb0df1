"""End-to-end ``dermbatch run`` with a small real-model bundle: formats, resume, errors, exit codes."""

import csv
import io
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from dermbatch.bundle import CLASSES
from dermbatch.cli.main import main


def _run(*args):
    return main(["run", *map(str, args)])


def _rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


@pytest.fixture
def finished_run(tiny_bundle, image_folder, tmp_path):
    out = tmp_path / "out" / "results.csv"
    code = _run(image_folder, "--out", out, "--model", tiny_bundle.path, "--masks", tmp_path / "masks",
                "--annotate", tmp_path / "ann", "--crops", tmp_path / "crops", "-b", "4", "--tta", "none", "--quiet")
    assert code == 0
    return out


def test_results_csv_is_accepted_by_the_official_scorer(finished_run):
    from isic_challenge_scoring.load_csv import parse_csv

    text = finished_run.read_text()
    assert text.splitlines()[0] == "image," + ",".join(CLASSES)
    table = parse_csv(io.StringIO(text), pd.Index(CLASSES))
    assert list(table.index) == [f"img_{i}" for i in range(6)]
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-5)


def test_masks_are_isic_task1_format(finished_run, image_folder, tmp_path):
    for image in sorted(image_folder.iterdir()):
        mask = Image.open(tmp_path / "masks" / f"{image.stem}_segmentation.png")
        assert mask.mode == "L" and mask.size == Image.open(image).size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert len(list((tmp_path / "ann").glob("*_annotated.jpg"))) == 6


def test_probabilities_equal_a_hand_computed_fold_ensemble(finished_run, tiny_bundle, tmp_path):
    """Independent check of the classification path: timm models + safetensors + numpy, on the written crop."""
    crop = cv2.cvtColor(cv2.imread(str(tmp_path / "crops" / "img_0_crop.png")), cv2.COLOR_BGR2RGB)
    x = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    batch = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
    logits = []
    for fold in (0, 1):
        model = timm.create_model("mobilenetv3_small_050", num_classes=7)
        model.load_state_dict(load_file(str(tiny_bundle.path / f"cls_fold{fold}.safetensors")))
        with torch.no_grad():
            logits.append(model.eval()(batch)[0])
    expected = torch.softmax(torch.stack(logits).mean(0), 0).numpy()
    row = _rows(finished_run)[0]
    np.testing.assert_allclose([float(row[c]) for c in CLASSES], expected, atol=2e-6)


def test_details_and_manifest(finished_run, tiny_bundle):
    details = _rows(finished_run.with_name("results_details.csv"))
    assert [d["status"] for d in details] == ["ok"] * 6
    assert all(d["prediction"] in CLASSES for d in details)
    manifest = json.loads(finished_run.with_name("results_manifest.json").read_text())
    assert manifest["summary"]["ok"] == 6 and manifest["summary"]["status"] == "finished"
    assert manifest["bundle"]["weights_sha256"] == tiny_bundle.hashes()
    assert set(manifest["summary"]["images_per_second"]) >= {"decode", "segment", "classify", "write"}


def test_resume_after_interruption_keeps_rows_and_adds_no_duplicates(finished_run, tiny_bundle, image_folder):
    lines = finished_run.read_text().splitlines(keepends=True)
    interrupted = "".join(lines[:4]) + lines[4][:12]  # header + 3 rows + a partial row
    finished_run.write_text(interrupted)
    code = _run(image_folder, "--out", finished_run, "--model", tiny_bundle.path, "--resume", "--tta", "none", "-q")
    assert code == 0
    text = finished_run.read_text()
    assert text.startswith("".join(lines[:4]))
    ids = [r["image"] for r in _rows(finished_run)]
    assert sorted(ids) == [f"img_{i}" for i in range(6)] and len(ids) == 6
    assert sorted(r["image"] for r in _rows(finished_run.with_name("results_details.csv"))) == sorted(ids)


def test_existing_output_needs_resume_or_overwrite(finished_run, tiny_bundle, image_folder, capsys):
    assert _run(image_folder, "--out", finished_run, "--model", tiny_bundle.path) == 2
    assert "--resume" in capsys.readouterr().err
    assert _run(image_folder, "--out", finished_run, "--model", tiny_bundle.path, "--overwrite", "-q") == 0


def test_bad_image_is_reported_and_the_batch_goes_on(tiny_bundle, image_folder, tmp_path, capsys):
    (image_folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    shutil.copy(image_folder / "img_0.jpg", image_folder / "zcut.jpg")
    data = (image_folder / "zcut.jpg").read_bytes()
    (image_folder / "zcut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "r.csv"
    assert _run(image_folder, "--out", out, "--model", tiny_bundle.path, "-b", "3", "--tta", "none") == 3
    err = capsys.readouterr().err
    assert "broken.jpg: not an image" in err and "zcut.jpg: truncated JPEG" in err
    assert [r["image"] for r in _rows(out)] == [f"img_{i}" for i in range(6)]
    details = {d["image"]: d for d in _rows(tmp_path / "r_details.csv")}
    assert details["broken"]["status"] == "error" and "not an image" in details["broken"]["error"]


def test_usage_errors_exit_2(tiny_bundle, tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.jpg"), Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    assert _run(tmp_path, "--out", tmp_path / "r.csv", "--model", tiny_bundle.path) == 2
    assert "two inputs have the image id 'x'" in capsys.readouterr().err
    assert _run(tmp_path / "a", "--out", tmp_path / "r.csv", "--model", tiny_bundle.path, "--folds", "0,7") == 2
    assert _run(tmp_path / "a", "--out", tmp_path / "r.csv", "--backend", "nope") == 2


def test_fatal_error_is_one_line_without_traceback(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    proc = subprocess.run([sys.executable, "-m", "dermbatch", "run", str(tmp_path), "--out",
                           str(tmp_path / "r.csv"), "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # a mistyped --model is a usage error
    assert proc.stderr.splitlines() == [f"Error: {tmp_path / 'missing'}: model bundle directory not found"]


def test_python_api_run_accepts_string_paths(tiny_bundle, image_folder, tmp_path):
    from dermbatch.pipeline import RunOptions, run

    summary = run(RunOptions(inputs=[str(image_folder)], out=str(tmp_path / "r.csv"), model=str(tiny_bundle.path),
                             masks=str(tmp_path / "m"), annotate=str(tmp_path / "a"), tta="none"))
    assert summary.ok == 6 and len(list((tmp_path / "m").iterdir())) == 6
