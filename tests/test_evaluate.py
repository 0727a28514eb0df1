"""`dermbatch evaluate` agrees with the official ISIC scorer on the same files; `dermbatch lr-find` runs."""

import json
import shutil

import pytest

from dermbatch.bundle import CLASSES
from dermbatch.cli.main import main
from tests.conftest import HAM, ISIC_SEG, ham_per_class, real_images

pytestmark = pytest.mark.realdata


def test_segmentation_scores_equal_the_official_scorer(tiny_bundle, tmp_path):
    from isic_challenge_scoring.segmentation import SegmentationScore

    images = real_images(ISIC_SEG, 8)
    (tmp_path / "in").mkdir(), (tmp_path / "truth").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).symlink_to(image)
        shutil.copy(ISIC_SEG / "masks" / f"{image.stem}_segmentation.png", tmp_path / "truth")
    assert main(["evaluate", "--images", str(tmp_path / "in"), "--masks", str(tmp_path / "truth"),
                 "--model", str(tiny_bundle.path), "--out", str(tmp_path / "ev")]) == 0
    ours = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["segmentation"]
    official = SegmentationScore.from_dir(tmp_path / "truth", tmp_path / "ev" / "masks").macro_average
    assert ours["images"] == 8
    assert ours["jaccard"] == pytest.approx(official["jaccard"], abs=1e-9)
    assert ours["thresholded_jaccard"] == pytest.approx(official["threshold_jaccard"], abs=1e-9)
    assert ours["dice"] == pytest.approx(official["dice"], abs=1e-9)


def test_classification_scores_equal_the_official_scorer(tiny_bundle, tmp_path):
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    ids, labels = ham_per_class(tmp_path / "in", 3)
    truth = labels.loc[ids, list(CLASSES)].rename_axis("image")
    truth.to_csv(tmp_path / "truth.csv")
    assert main(["evaluate", "--images", str(tmp_path / "in"), "--labels", str(tmp_path / "truth.csv"),
                 "--model", str(tiny_bundle.path), "--out", str(tmp_path / "ev")]) == 0
    ours = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["classification"]
    official = ClassificationScore.from_file(tmp_path / "truth.csv", tmp_path / "ev" / "predictions.csv",
                                             ClassificationMetric.BALANCED_ACCURACY)
    assert ours["images"] == len(ids)
    assert ours["balanced_accuracy"] == pytest.approx(official.overall, abs=1e-9)


def test_lr_find_saves_a_curve_and_suggests_a_rate(tmp_path, capsys):
    real_images(HAM, 1)
    code = main(["lr-find", "--task", "cls", "--images", str(HAM / "images"), "--labels", str(HAM / "labels.csv"),
                 "--masks", str(HAM / "masks"), "--encoder", "mobilenetv3_small_050", "--pretrained", "none",
                 "--input-size", "48", "--batch-size", "8", "--steps", "12", "--limit", "64",
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lr.png")])
    assert code == 0
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = capsys.readouterr().out
    rate = float(line.split("suggested learning rate: ")[1].split()[0])
    assert 1e-6 <= rate <= 1.0


def test_lr_find_sweeps_the_tune_stages_recipe(tmp_path, capsys, monkeypatch):
    import tempfile

    real_images(HAM, 1)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    code = main(["lr-find", "--task", "cls", "--images", str(HAM / "images"), "--labels", str(HAM / "labels.csv"),
                 "--masks", str(HAM / "masks"), "--input-size", "48", "--batch-size", "8", "--steps", "12",
                 "--limit", "48", "--tune-stages", "5", "--lora-rank", "2", "--jitter-views", "1",
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lr.png")])
    assert code == 0 and (tmp_path / "lr.png").stat().st_size > 0
    rate = float(capsys.readouterr().out.split("suggested learning rate: ")[1].split()[0])
    assert 1e-6 <= rate <= 1.0
    assert not list((tmp_path / "tmp").glob("dermbatch-lr-find-*"))  # the trunk cache is removed after the sweep
