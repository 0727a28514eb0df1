"""Screening operating points: choosing thresholds, lesion-grouped intervals, `run --screen`, `evaluate`."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermbatch.bundle import CLASSES, load_bundle
from dermbatch.cli.main import main
from dermbatch.errors import UsageError
from dermbatch.screening import (
    OperatingPoint,
    bootstrap_intervals,
    choose_points,
    parse_screen,
    select_points,
    sensitivity_specificity,
    threshold_for_sensitivity,
)
from tests.conftest import synthetic_lesion


def test_threshold_reaches_the_requested_sensitivity_on_a_known_score_set():
    positives = np.arange(1, 101) / 100  # 0.01 .. 1.00
    negatives = np.arange(0, 200) / 200 + 0.0025  # 0.0025 .. 0.9975
    scores = np.concatenate([positives, negatives])
    positive = np.arange(len(scores)) < 100
    for target, threshold in ((0.80, 0.21), (0.90, 0.11), (0.95, 0.06), (0.905, 0.10)):
        assert threshold_for_sensitivity(scores, positive, target) == pytest.approx(threshold)
        sens, spec = sensitivity_specificity(scores, positive, threshold)
        assert sens == pytest.approx(round(1.01 - threshold, 2))  # the positives at or above the threshold
        assert spec == pytest.approx(np.sum(negatives < threshold) / 200)


def test_bootstrap_resamples_lesions_not_images():
    rng = np.random.default_rng(1)
    scores, positive = rng.random(300), rng.random(300) < 0.3
    one_each = bootstrap_intervals(scores, positive, [f"L{i:03d}" for i in range(300)], 0.5, 500, seed=3)
    # every lesion photographed 5 times: resampling whole lesions gives exactly the one-image-per-lesion intervals
    repeated = np.repeat(np.arange(300), 5)
    grouped = bootstrap_intervals(scores[repeated], positive[repeated], [f"L{i:03d}" for i in repeated], 0.5, 500,
                                  seed=3)
    assert np.allclose(grouped, one_each)
    by_image = bootstrap_intervals(scores[repeated], positive[repeated], list(range(1500)), 0.5, 500, seed=3)
    for (low, high), (glow, ghigh) in zip(by_image, grouped, strict=True):
        assert high - low < 0.6 * (ghigh - glow)  # treating copies as independent would overstate certainty


def test_choose_points_covers_both_scores_and_all_targets():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), 700)
    probs = rng.dirichlet(np.ones(len(CLASSES)), 700)
    probs[np.arange(700), labels] += 1.0
    probs /= probs.sum(1, keepdims=True)
    points = choose_points(probs, labels, [str(i // 2) for i in range(700)], CLASSES, resamples=200)
    assert [p.name for p in points] == ["mel@0.80", "mel@0.90", "mel@0.95", "malignant@0.80", "malignant@0.90",
                                        "malignant@0.95"]
    for p in points:
        assert p.sensitivity >= p.target and p.sensitivity_ci[0] <= p.sensitivity <= p.sensitivity_ci[1]
        assert p.specificity_ci[0] <= p.specificity <= p.specificity_ci[1]
    assert points[0].threshold > points[1].threshold > points[2].threshold  # higher sensitivity: lower bar
    assert points[0].positives == int(np.sum(labels == 0))
    assert points[3].positives == int(np.isin(labels, [0, 2, 3]).sum())


@pytest.mark.parametrize(("spec", "message"), [("mel@1.5", "between 0 and 1"), ("foo@0.9", "SCORE@SENSITIVITY"),
                                               ("mel", "SCORE@SENSITIVITY"), ("mel@0", "between 0 and 1")])
def test_bad_screen_specs_are_refused(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_screen([spec])


def _point(score="mel", target=0.9, threshold=0.5) -> OperatingPoint:
    return OperatingPoint(score, target, threshold, 0.91, (0.88, 0.94), 0.6, (0.55, 0.65), 100, 900)


def test_select_points_names_what_is_stored():
    stored = (_point(), _point("malignant", 0.95))
    assert select_points(["malignant@0.95", "mel@0.9"], stored, "b") == (stored[1], stored[0])
    with pytest.raises(UsageError, match="mel@0.80: not stored in bundle b; stored: mel@0.90, malignant@0.95"):
        select_points(["mel@0.8"], stored, "b")
    with pytest.raises(UsageError, match="stores no screening operating points"):
        select_points(["mel@0.9"], (), "b")


@pytest.fixture(scope="module")
def screened_once(tiny_bundle, tmp_path_factory):
    """The tiny bundle with two points whose thresholds split its images' scores; the images; their rows."""
    from trainer.operating_points import store_points

    root = tmp_path_factory.mktemp("screened")
    bundle = Path(shutil.copytree(tiny_bundle.path, root / "bundle"))
    folder = root / "images"
    folder.mkdir()
    for i in range(8):
        synthetic_lesion(folder / f"img_{i}.jpg", seed=i, radius=(10 + 4 * i, 12 + 5 * i))
    assert main(["run", str(folder), "--out", str(root / "plain.csv"), "--model", str(bundle), "-q"]) == 0
    rows = list(csv.DictReader(open(root / "plain.csv")))
    mel = np.array([float(r["MEL"]) for r in rows])
    malignant = np.array([float(r["MEL"]) + float(r["BCC"]) + float(r["AKIEC"]) for r in rows])
    points = [_point("mel", 0.9, float(np.median(mel))), _point("malignant", 0.95, float(np.median(malignant)))]
    store_points(bundle, points, {"images": 1000, "lesions": 800, "folds": [0, 1]})
    return bundle, folder, rows


@pytest.fixture
def screened(screened_once, tmp_path):
    """A private copy of ``screened_once``'s bundle (a test may change it), its images and rows."""
    bundle, folder, rows = screened_once
    return Path(shutil.copytree(bundle, tmp_path / "bundle")), folder, rows


def test_run_screen_adds_score_and_flag_columns_that_round_trip(screened, tmp_path, capsys):
    bundle, folder, plain = screened
    out = tmp_path / "r.csv"
    code = main(["run", str(folder), "--out", str(out), "--model", str(bundle), "--screen", "mel@0.90",
                 "--screen", "malignant@0.95", "--annotate", str(tmp_path / "ann"), "--report", str(tmp_path / "rep")])
    assert code == 0
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["image", *CLASSES, "score_mel", "score_malignant", "suspicious_mel_90",
                      "suspicious_malignant_95"]
    rows = list(csv.DictReader(open(out)))
    assert [{c: r[c] for c in ("image", *CLASSES)} for r in rows] == plain  # the ISIC columns are unchanged
    points = {p.column: p for p in load_bundle(bundle).screening}
    for row in rows:
        mel = float(row["MEL"])
        malignant = mel + float(row["BCC"]) + float(row["AKIEC"])
        assert float(row["score_mel"]) == pytest.approx(mel, abs=2e-6)
        assert float(row["score_malignant"]) == pytest.approx(malignant, abs=5e-6)
        for column, value in (("suspicious_mel_90", mel), ("suspicious_malignant_95", malignant)):
            if abs(value - points[column].threshold) > 1e-5:  # clear of the rounding of the printed scores
                assert row[column] == ("1" if value >= points[column].threshold else "0")
    flagged = sum(r["suspicious_mel_90"] == "1" for r in rows)
    assert 0 < flagged < len(rows)
    err = capsys.readouterr().err
    assert (f"{flagged} of {len(rows)} flagged as suspicious for melanoma at sensitivity 0.90; expected "
            "specificity 0.60 [0.55, 0.65] from training") in err
    page = (tmp_path / "rep" / "index.html").read_text()
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert sum("mel@0.90" in d["sus"] for d in data["images"]) == flagged
    manifest = json.loads((tmp_path / "r_manifest.json").read_text())
    assert manifest["summary"]["flagged"]["mel@0.90"] == flagged


def test_resume_needs_the_same_screen_columns(screened, tmp_path, capsys):
    bundle, folder, _ = screened
    out = tmp_path / "r.csv"
    args = ["run", str(folder), "--out", str(out), "--model", str(bundle), "-q", "--screen", "mel@0.90"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    assert main([*args[:-2], "--resume"]) == 2
    assert "resume with the --screen options of the first run" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["mel@1.5", "foo@0.9", "mel@0.80"])
def test_screen_errors_come_before_any_image_is_read(screened, tmp_path, capsys, spec):
    bundle, folder, _ = screened
    out = tmp_path / "r.csv"
    assert main(["run", str(folder), "--out", str(out), "--model", str(bundle), "--screen", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: --screen")
    assert not out.exists()


def test_bundle_without_points_refuses_screen(tiny_bundle, tmp_path, capsys):
    synthetic_lesion(tmp_path / "a.jpg")
    assert main(["run", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "r.csv"), "--model",
                 str(tiny_bundle.path), "--screen", "mel@0.90"]) == 2
    assert "stores no screening operating points" in capsys.readouterr().err


def test_malformed_stored_points_are_a_bundle_error(screened):
    from dermbatch.errors import BundleError

    bundle = screened[0]
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["classification"]["screening"]["points"][0]["score"] = "nevus"
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="classification.screening"):
        load_bundle(bundle)


def test_check_points_reports_promised_and_reached():
    from trainer.screening_eval import check_points

    labels = np.array([0] * 50 + [1] * 150)
    probs = np.full((200, len(CLASSES)), 0.1)
    probs[:, 0] = np.concatenate([np.linspace(0.2, 0.9, 50), np.linspace(0.0, 0.3, 150)])
    report = check_points([_point("mel", 0.9, 0.25)], probs, labels, [str(i) for i in range(200)])
    reached = report["points"]["mel@0.90"]["reached"]
    assert reached["sensitivity"] == pytest.approx(np.mean(np.linspace(0.2, 0.9, 50) >= 0.25))
    assert reached["specificity"] == pytest.approx(np.mean(np.linspace(0.0, 0.3, 150) < 0.25))
    assert report["points"]["mel@0.90"]["promised"]["specificity"] == 0.6
    assert report["grouped_by"] == "image"


@pytest.mark.realdata
def test_evaluate_reports_each_stored_point_on_labelled_images(screened, tmp_path):
    from tests.conftest import ham_per_class

    bundle = screened[0]
    ids, labels = ham_per_class(tmp_path / "in", 4)
    labels.loc[ids, ["lesion_id", *CLASSES]].rename_axis("image").to_csv(tmp_path / "truth.csv")
    assert main(["evaluate", "--images", str(tmp_path / "in"), "--labels", str(tmp_path / "truth.csv"), "--model",
                 str(bundle), "--out", str(tmp_path / "ev"), "--no-explain"]) == 0
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["screening"]
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    truth = {i: labels.loc[i, "label"] for i in ids}
    for point in load_bundle(bundle).screening:  # recomputed here from the predictions CSV and the labels
        classes = ("MEL",) if point.score == "mel" else ("MEL", "BCC", "AKIEC")
        scores = np.array([sum(float(r[c]) for c in classes) for r in rows])
        positive = np.array([truth[r["image"]] in classes for r in rows])
        reached = report["points"][point.name]["reached"]
        assert reached["sensitivity"] == pytest.approx(np.mean(scores[positive] >= point.threshold), abs=1e-4)
        assert reached["specificity"] == pytest.approx(np.mean(scores[~positive] < point.threshold), abs=1e-4)
        assert report["points"][point.name]["promised"]["sensitivity"] == point.sensitivity
    assert report["grouped_by"] == "lesion_id"
    assert (tmp_path / "ev" / "screening_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "Screening operating points" in (tmp_path / "ev" / "report.html").read_text()
