"""Packing a bundle for distribution (fp16 storage, checked), and the installed default bundle's first use."""

import importlib.util
import json
import shutil

import numpy as np
import pytest

from dermbatch.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from dermbatch.cli.main import main
from dermbatch.predictor import Predictor


def test_pack_halves_the_weights_and_records_the_check(tiny_bundle, image_folder, tmp_path):
    out = tmp_path / "packed"
    assert main(["pack", "--model", str(tiny_bundle.path), "--out", str(out), "--check-images", str(image_folder),
                 "--tolerance", "1"]) == 0
    packed = load_bundle(out)
    for task in ("segmentation", "classification"):
        original, half = tiny_bundle.read_weights(task, 0), packed.read_weights(task, 0)
        for key, value in original.items():  # read back as float32, equal to the fp16 rounding of the original
            assert half[key].dtype == value.dtype
            np.testing.assert_array_equal(half[key].numpy(), value.half().float().numpy() if value.is_floating_point()
                                          else value.numpy())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size < 0.55 * sum(p.stat().st_size for p in tiny_bundle.path.glob("*.safetensors"))
    check = json.loads((out / "bundle.json").read_text())["provenance"]["packed"]
    assert check["storage"] == {"segmentation": "float16", "classification": "float16"}
    assert check["images"] == 6 and 0 <= check["max_prob_diff"] < 1
    assert "segmentation float16, classification float16" in (out / "README.md").read_text()


def test_pack_half_lora_halves_only_the_low_rank_factors_of_tuned_folds(tiny_bundle, tmp_path):
    import torch

    from dermbatch.bundle import save_weights

    shutil.copytree(tiny_bundle.path, tmp_path / "tuned")
    bundle = load_bundle(tmp_path / "tuned")
    torch.manual_seed(0)
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    for fold in (0, 1):  # what --tune-stages stores per fold: low-rank factors beside a classifier
        state = bundle.read_weights("classification", fold, shared=False)
        state |= {"backbone.conv_head.lora_a": torch.randn(4, 8) / 3, "backbone.conv_head.lora_b": torch.randn(8, 4)}
        name, digest = save_weights(bundle.path, "classification", fold, state)
        manifest["weights"][name] = digest
    (bundle.path / "bundle.json").write_text(json.dumps(manifest))
    bundle = load_bundle(bundle.path)
    out = tmp_path / "packed"
    assert main(["pack", "--model", str(bundle.path), "--out", str(out), "--half", "lora"]) == 0
    packed = load_bundle(out)
    original, half = bundle.read_weights("classification", 1, shared=False), packed.read_weights(
        "classification", 1, shared=False)
    for key, value in original.items():
        expected = value.half().float() if key.endswith((".lora_a", ".lora_b")) else value
        assert torch.equal(half[key], expected), key  # everything else stays float32
    for key, value in bundle.read_weights("segmentation", 0).items():
        assert torch.equal(packed.read_weights("segmentation", 0)[key], value)
    assert not torch.equal(half["backbone.conv_head.lora_a"], original["backbone.conv_head.lora_a"])
    storage = json.loads((out / "bundle.json").read_text())["provenance"]["packed"]["storage"]
    assert storage["classification"] == "float32, low-rank updates float16"


def test_pack_keeps_float32_for_the_tasks_not_halved(tiny_bundle, tmp_path):
    out = tmp_path / "packed"
    assert main(["pack", "--model", str(tiny_bundle.path), "--out", str(out), "--half", "seg"]) == 0
    packed = load_bundle(out)
    for key, value in tiny_bundle.read_weights("classification", 1).items():
        np.testing.assert_array_equal(packed.read_weights("classification", 1)[key].numpy(), value.numpy())
    assert main(["pack", "--model", str(tiny_bundle.path), "--out", str(tmp_path / "x"), "--half", "bogus"]) == 2


def test_pack_refuses_a_difference_above_the_tolerance(tiny_bundle, image_folder, tmp_path, capsys):
    assert main(["pack", "--model", str(tiny_bundle.path), "--out", str(tmp_path / "p"), "--check-images",
                 str(image_folder), "--tolerance", "0"]) != 0
    assert "--half none" in capsys.readouterr().err


def test_default_bundle_builds_its_engine_on_first_use(tiny_bundle, image_folder, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    default = tmp_path / "site" / "default"
    shutil.copytree(tiny_bundle.path, default)
    monkeypatch.setattr("dermbatch.bundle.DEFAULT_BUNDLE_DIR", default)
    monkeypatch.setenv("DERMBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DERMBATCH_NO_AUTO_ENGINE", raising=False)
    monkeypatch.delenv("DERMBATCH_MODEL", raising=False)
    target, name = ("openvino", "OpenVINO") if importlib.util.find_spec("openvino") else ("onnxruntime",
                                                                                          "ONNX Runtime")
    assert main(["run", str(image_folder), "--out", str(tmp_path / "a.csv"), "--device", "cpu"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"backend: {target} (auto; first use of the default bundle: built its {name} fp32 engine" in err
    assert not (default / "engines").exists()  # the package folder stays untouched
    assert len(list((tmp_path / "cache" / "engines").glob(f"*/{target}-fp32/engine.json"))) == 1
    assert main(["run", str(image_folder), "--out", str(tmp_path / "b.csv"), "--device", "cpu"]) == 0
    assert f"an {name} engine is built for this bundle" in " ".join(capsys.readouterr().err.split())
    with Predictor(None, backend="torch", device="cpu") as predictor:  # the engine gives torch's probabilities
        torch_probs = {r.image_id: r.probabilities for r in predictor.predict(image_folder)}
    rows = (tmp_path / "b.csv").read_text().splitlines()[1:]
    for row in rows:
        image, *values = row.split(",")
        np.testing.assert_allclose(np.array(values, float), torch_probs[image], atol=5e-5)


@pytest.mark.skipif(not (DEFAULT_BUNDLE_DIR / "bundle.json").is_file(), reason="no default bundle installed")
def test_installed_default_bundle_runs_the_sample_images(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("DERMBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DERMBATCH_MODEL", raising=False)
    samples = Path(__file__).resolve().parents[1] / "sample_images"
    assert main(["run", str(samples), "--out", str(tmp_path / "results.csv"), "--masks", str(tmp_path / "m"),
                 "--annotate", str(tmp_path / "a"), "-q"]) == 0
    images = sorted(p.stem for p in samples.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    rows = (tmp_path / "results.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == images
    assert len(list((tmp_path / "m").iterdir())) == len(images) == len(list((tmp_path / "a").iterdir()))
    bundle = load_bundle(None)
    assert sum(p.stat().st_size for p in bundle.path.iterdir() if p.is_file()) < 80e6
    import csv

    details = {r["image"]: r for r in csv.DictReader(open(tmp_path / "results_details.csv"))}
    # the calibrated no-lesion decision: the lesion-free sample loses its phantom mask, the others keep theirs
    assert details["sample_07_no_lesion"]["lesion_found"] == "false"
    assert float(details["sample_07_no_lesion"]["lesion_probability"]) < bundle.quality.thresholds["lesion"]
    assert all(d["lesion_found"] == "true" and float(d["mask_quality"]) > 0.5 for i, d in details.items()
               if i != "sample_07_no_lesion")


def test_scaled_crop_grows_and_shrinks_the_crop_around_the_same_lesion_box():
    from dermbatch.bundle import CropSpec
    from dermbatch.errors import UsageError
    from dermbatch.preprocess import lesion_crop, scaled_crop

    rgb = np.zeros((150, 200, 3), np.uint8)
    mask = np.zeros((150, 200), np.uint8)
    mask[55:95, 80:120] = 1  # a 40 x 40 lesion box, centred at (100, 75)
    crop = CropSpec(margin=0.1)
    assert scaled_crop(crop, 1) is crop
    sides = {s: lesion_crop(rgb, mask, scaled_crop(crop, s))[1] for s in (0.85, 1, 1.25)}
    assert sides[1] == (76, 51, 48, 48)  # 40 * (1 + 2 * 0.1)
    assert sides[1.25] == (70, 45, 60, 60)  # 48 * 1.25, same centre
    assert sides[0.85] == (79, 54, 41, 41)  # ceil(48 * 0.85)
    with pytest.raises(UsageError, match="crop scale 0.8 cuts into the lesion: .* allows scales of 0.833 and more"):
        scaled_crop(crop, 0.8)


def test_crop_scales_refuse_what_is_not_a_list_of_distinct_sizes(tiny_bundle):
    from dermbatch.errors import UsageError
    from dermbatch.predictor import parse_crop_scales

    assert parse_crop_scales("0.85,1,1.2") == (0.85, 1.0, 1.2)
    for bad in ("a,b", "0", "1,1", "", "5"):
        with pytest.raises(UsageError, match="--crop-scales"):
            parse_crop_scales(bad)
    with pytest.raises(UsageError, match="cuts into the lesion"):
        Predictor(tiny_bundle.path, backend="torch", crop_scales="0.5,1")


@pytest.mark.skipif(not (DEFAULT_BUNDLE_DIR / "bundle.json").is_file(), reason="no default bundle installed")
def test_crop_scales_average_the_logits_of_each_scale_with_the_default_bundle():
    from pathlib import Path

    samples = sorted((Path(__file__).resolve().parents[1] / "sample_images").glob("sample_0[1-3]*"))

    def probs(scales: str) -> np.ndarray:
        with Predictor(None, backend="torch", device="cpu", workers=0, crop_scales=scales) as predictor:
            assert predictor.describe()["crop_scales"] == [float(s) for s in scales.split(",")]
            return np.array([r.probabilities for r in predictor.predict(samples)])

    single = {s: probs(s) for s in ("0.85", "1", "1.2")}
    assert len(samples) == 3 and not np.allclose(single["1"], single["1.2"], atol=1e-3)  # the crops really differ
    mean_log = np.mean([np.log(p) for p in single.values()], axis=0)  # softmax of the mean logit, computed apart
    expected = np.exp(mean_log) / np.exp(mean_log).sum(1, keepdims=True)
    np.testing.assert_allclose(probs("0.85,1,1.2"), expected, atol=1e-5)
