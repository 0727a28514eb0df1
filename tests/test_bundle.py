import json
import shutil

import pytest
import torch

from dermbatch.bundle import load_bundle
from dermbatch.errors import BundleError
from dermbatch.models import build_model, load_fold_model
from tests.conftest import shared_backbone_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle.path, tmp_path / "b")


def _edit_manifest(root, edit):
    manifest = json.loads((root / "bundle.json").read_text())
    edit(manifest)
    (root / "bundle.json").write_text(json.dumps(manifest))


def test_bundle_roundtrip_loads_the_saved_weights(tiny_bundle):
    bundle = load_bundle(tiny_bundle.path)
    assert bundle.classes == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert bundle.segmentation.folds == (0, 1)
    model = load_fold_model(bundle, "classification", 1)
    fresh = build_model(bundle.classification)
    key = next(k for k, v in model.state_dict().items() if v.is_floating_point() and v.numel() > 10)
    assert not torch.equal(model.state_dict()[key], fresh.state_dict()[key])  # weights really loaded
    from safetensors.torch import load_file
    saved = load_file(str(tiny_bundle.path / "cls_fold1.safetensors"))
    assert torch.equal(model.state_dict()[key], saved[key])


def test_tampered_weights_are_refused_by_hash(bundle_copy):
    path = bundle_copy / "seg_fold0.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        bundle.read_weights("segmentation", 0)
    bundle.read_weights("segmentation", 1)  # the untouched fold still loads


def test_swapped_weight_files_are_refused(bundle_copy):
    a, b = bundle_copy / "seg_fold0.safetensors", bundle_copy / "seg_fold1.safetensors"
    tmp = bundle_copy / "tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle_copy).read_weights("segmentation", 0)


def test_missing_weight_file(bundle_copy):
    (bundle_copy / "cls_fold1.safetensors").unlink()
    with pytest.raises(BundleError, match="cls_fold1.safetensors: weight file listed in bundle.json is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=99), "format_version: is 99"),
    (lambda m: m.update(classes=["NV", "MEL"]), "classes: must be the ISIC 2018 classes"),
    (lambda m: m.update(extra=1), "extra: unknown key"),
    (lambda m: m["segmentation"].update(input_size=[64]), r"segmentation.input_size: must be \[height, width\]"),
    (lambda m: m["segmentation"].update(tta="rot"), "segmentation.tta: is 'rot'"),
    (lambda m: m["classification"].update(folds=[0, 3]), "cls_fold3.safetensors .* is not listed"),
    (lambda m: m["segmentation"].update(threshold=1.5), "segmentation.threshold"),
    (lambda m: m["crop"].update(background="blur"), "crop.background"),
    (lambda m: m["weights"].update({"seg_fold0.safetensors": "abc"}), "sha256 hex digest"),
    (lambda m: m["weights"].update({"../evil.safetensors": "0" * 64}), "file names must look like"),
])
def test_manifest_validation_names_the_field(bundle_copy, edit, message):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)


def test_unknown_architecture_lists_valid_names(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["segmentation"].update(architecture="segformer9"))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="valid: deeplabv3plus, fpn, linknet, unet, unetplusplus"):
        load_fold_model(bundle, "segmentation", 0)


def test_shared_tensors_are_stored_once_and_merged_into_every_fold(tmp_path):
    bundle, state = shared_backbone_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "cls_fold0.safetensors", "cls_fold1.safetensors", "cls_shared.safetensors"]
    size = {p.name: p.stat().st_size for p in tmp_path.glob("*.safetensors")}
    assert size["cls_fold0.safetensors"] < 0.1 * size["cls_shared.safetensors"]
    models = [load_fold_model(bundle, "classification", f) for f in (0, 1)]  # strict load: nothing missing
    key = "backbone.conv_stem.weight"
    assert torch.equal(models[0].state_dict()[key], state[key]) and torch.equal(models[1].state_dict()[key], state[key])
    assert not torch.equal(models[0].classifier.weight, models[1].classifier.weight)
    assert set(bundle.read_weights("classification", 0, shared=False)) == {"classifier.weight", "classifier.bias"}


def test_a_tampered_shared_file_or_a_tensor_in_both_files_is_refused(tmp_path):
    from dermbatch.bundle import save_weights

    bundle, state = shared_backbone_bundle(tmp_path)
    data = bytearray((tmp_path / "cls_shared.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "cls_shared.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cls_shared.safetensors: sha256"):
        bundle.read_weights("classification", 1)

    other = tmp_path / "other"
    bundle, state = shared_backbone_bundle(other)
    name, digest = save_weights(other, "classification", 0, {"classifier.weight": state["classifier.weight"],
                                                              "classifier.bias": state["classifier.bias"],
                                                              "backbone.conv_stem.weight": state[
                                                                  "backbone.conv_stem.weight"]})
    _edit_manifest(other, lambda m: m["weights"].update({name: digest}))
    with pytest.raises(BundleError, match="backbone.conv_stem.weight is also in cls_shared.safetensors"):
        load_bundle(other).read_weights("classification", 0)


def test_multistage_classifier_reads_the_mean_and_std_of_every_stage():
    from dermbatch.models import MultiStageClassifier

    model = MultiStageClassifier("tf_efficientnet_lite0", 7).eval()
    assert model.num_features == 2 * (16 + 24 + 40 + 80 + 112 + 192 + 320 + 1280)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), model.classifier(model.features(x)))
        head = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        features = model.features(x)
        assert torch.allclose(features[:, -2560:-1280], head, atol=1e-6)  # timm's pooled head, then its std
        assert torch.allclose(features[:, -1280:], model.backbone.forward_features(x).std((2, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="EfficientNet-style"):
        MultiStageClassifier("mobilenetv3_small_050", 7)


@pytest.mark.parametrize("tuned_from", [None, 3, 0])
def test_torch_backend_computes_shared_features_once_with_each_folds_classifier(tmp_path, tuned_from):
    import numpy as np

    from dermbatch.backends.torch import TorchBackend
    from dermbatch.models import SharedBackboneFolds

    bundle, _ = shared_backbone_bundle(tmp_path, tuned_from)
    backend = TorchBackend(bundle, "cpu", {"classification": (0, 1)})
    assert len(backend.models["classification"]) == 1
    shared = backend.models["classification"][0]
    assert isinstance(shared, SharedBackboneFolds)  # the stem at least is the same in both folds
    assert shared.stages == {None: 6, 3: 3, 0: 0}[tuned_from]  # 5 block stages; 6: the head convolution too
    x = np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float32)  # more than one chunk of 4
    with torch.no_grad():
        expected = np.stack([load_fold_model(bundle, "classification", f)(torch.from_numpy(x)).numpy() for f in (0, 1)])
    np.testing.assert_allclose(backend.classify(x), expected, atol=1e-5)
