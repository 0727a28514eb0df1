"""Grad-CAM and guided backpropagation against hand computations; `run --explain` writes one heatmap per image."""

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dermbatch.bundle import DEFAULT_BUNDLE_DIR
from dermbatch.cli.main import main
from dermbatch.explain import blend_heatmap, grad_cam, guided_backprop, heat_in_mask, without_inplace


class PoolLinear(nn.Module):
    """Features = the input itself; head = global average pooling + linear: Grad-CAM has a closed form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data = weight

    def forward_features(self, x):
        return x

    def forward_head(self, features):
        return self.fc(features.mean((2, 3)))


def test_grad_cam_equals_the_closed_form():
    rng = np.random.default_rng(0)
    weight = torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32)
    x = torch.tensor(rng.normal(size=(2, 4, 5, 6)), dtype=torch.float32)
    classes = torch.tensor([2, 0])
    cam = grad_cam(PoolLinear(weight), x, classes).numpy()
    for b, c in enumerate(classes.tolist()):
        # d y_c / d A_k = w_ck / (h w) everywhere, so the map is ReLU(sum_k w_ck / (h w) A_k), scaled to max 1
        expected = np.maximum(np.einsum("k,khw->hw", weight[c].numpy() / 30, x[b].numpy()), 0)
        np.testing.assert_allclose(cam[b], expected / expected.max(), rtol=1e-5, atol=1e-6)


class Staged(nn.Module):
    """timm-like stages: Grad-CAM reads blocks[-2], whose output here is the input, then pool + linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity(), nn.ReLU())
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data = weight

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def test_grad_cam_reads_the_second_to_last_stage():
    rng = np.random.default_rng(1)
    weight = torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32)
    x = torch.tensor(rng.random((2, 4, 5, 6)), dtype=torch.float32) + 0.1  # positive: the last ReLU passes all
    classes = torch.tensor([1, 2])
    np.testing.assert_allclose(grad_cam(Staged(weight), x, classes).numpy(),
                               grad_cam(PoolLinear(weight), x, classes).numpy(), rtol=1e-5, atol=1e-6)


def test_grad_cam_peaks_where_the_class_evidence_is():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, 1, 6] = 5.0  # evidence for class 0 top right
    x[0, 1, 6, 1] = 5.0  # evidence for class 1 bottom left
    cam0 = grad_cam(PoolLinear(weight), x, torch.tensor([0]))[0]
    cam1 = grad_cam(PoolLinear(weight), x, torch.tensor([1]))[0]
    assert divmod(int(cam0.argmax()), 8) == (1, 6)
    assert divmod(int(cam1.argmax()), 8) == (6, 1)


def test_guided_backprop_passes_only_positive_gradients_through_relus():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    classes = torch.tensor([0, 1, 2, 1])
    guided = guided_backprop(without_inplace(model), x, classes).numpy()
    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2 = model[2].weight.detach().numpy()
    for i, c in enumerate(classes.tolist()):
        z = w1 @ x[i].numpy() + b1
        upstream = np.maximum(w2[c] * (z > 0), 0)  # ReLU gradient, then guided: negatives stopped
        np.testing.assert_allclose(guided[i], w1.T @ upstream, rtol=1e-5, atol=1e-6)
    plain = torch.autograd.functional.jacobian(lambda v: model(v[None])[0, 0], x[0]).numpy()
    assert not np.allclose(guided[0], plain)  # the hooks changed something


def test_heat_in_mask_and_blend():
    heat = np.zeros((10, 10), np.float32)
    heat[2:5, 2:5] = 1.0
    heat[8, 8] = 1.0
    mask = np.zeros((20, 20), np.uint8)
    mask[4:10, 4:10] = 1  # covers heat[2:5, 2:5] at half resolution
    assert heat_in_mask(heat, mask) == pytest.approx(9 / 10)
    blended = blend_heatmap(np.full((50, 80, 3), 128, np.uint8), heat)
    assert blended.shape == (256, 410, 3) and blended.dtype == np.uint8


def test_heatmap_figure_has_the_colour_bar_and_the_caption():
    from dermbatch.heatmap import COLOUR_BAR, heatmap_figure

    heat = np.zeros((10, 16), np.float32)
    figure = heatmap_figure(np.full((50, 80, 3), 128, np.uint8), heat, "MEL 87.0%")
    assert figure.shape == (256, 410 + COLOUR_BAR, 3)
    bar = figure[:, -COLOUR_BAR:]
    assert bar[0, 0, 2] > 100 and bar[0, 0, 0] < 50  # top: JET's red (BGR), heat 1
    assert bar[-1, 0, 0] > 100 and bar[-1, 0, 2] < 50  # bottom: JET's blue, heat 0
    plain = blend_heatmap(np.full((50, 80, 3), 128, np.uint8), heat)
    assert (figure[:20, :60] != plain[:20, :60]).any() and (figure[200:, :-COLOUR_BAR] == plain[200:]).all()


def test_run_explain_writes_heatmaps_with_an_engine_backend(tiny_bundle, image_folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    bundle = tmp_path / "bundle"
    import shutil

    shutil.copytree(tiny_bundle.path, bundle)
    assert main(["build-engine", "--model", str(bundle), "--target", "onnxruntime"]) == 0
    code = main(["run", str(image_folder), "--out", str(tmp_path / "r.csv"), "--model", str(bundle),
                 "--backend", "onnxruntime", "--explain", str(tmp_path / "cam"), "--guided"])
    assert code == 0
    cams = sorted(p.name for p in (tmp_path / "cam").glob("*_gradcam.jpg") if "guided" not in p.name)
    assert cams == [f"img_{i}_gradcam.jpg" for i in range(6)]
    assert len(list((tmp_path / "cam").glob("*_guided_gradcam.jpg"))) == 6
    assert cv2.imread(str(tmp_path / "cam" / "img_0_gradcam.jpg")).shape[0] >= 256
    assert "computed with the bundle's torch classifier folds" in " ".join(capsys.readouterr().err.split())


def test_guided_without_explain_is_a_usage_error(tiny_bundle, image_folder, tmp_path, capsys):
    code = main(["run", str(image_folder), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle.path),
                 "--guided"])
    assert code == 2
    assert "--explain" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.skipif(not (DEFAULT_BUNDLE_DIR / "bundle.json").is_file(), reason="no default bundle installed")
def test_default_bundle_heatmaps_land_on_the_lesion():
    """On real HAM10000 images with ground-truth masks: the share of each heatmap's mass inside the true lesion
    (within the crop) beats the share a uniform map would have (the lesion's share of the crop area)."""
    from dermbatch.explain import Explainer
    from dermbatch.predictor import Predictor
    from tests.conftest import HAM, real_images

    images = real_images(HAM, 4000)[::100]  # 40 images spread over the data set
    with Predictor(None, backend="torch", device="cpu", workers=0) as predictor:
        explainer = Explainer(predictor.bundle, predictor.folds["classification"], "cpu")
        results = [r for r in predictor.predict(images) if r.ok and r.lesion_found]
        explainer.explain(results)
    wins = []
    for r in results:
        truth = cv2.imread(str(HAM / "masks" / f"{r.image_id}_segmentation.png"), cv2.IMREAD_GRAYSCALE)
        truth = cv2.resize(truth, r.mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 127
        x, y, w, h = r.crop_box
        lesion = truth[y:y + h, x:x + w]
        wins.append(heat_in_mask(r.heatmap, lesion) > lesion.mean())
    assert len(results) >= 35
    assert np.mean(wins) >= 0.7, f"heat on the lesion more than uniform for only {np.mean(wins):.0%} of images"


def test_grad_cam_of_a_multistage_classifier_reads_its_backbone():
    from dermbatch.explain import target_layer
    from dermbatch.models import MultiStageClassifier

    torch.manual_seed(0)
    model = MultiStageClassifier("test_efficientnet", 7).eval()
    assert target_layer(model) is model.backbone.blocks[-1]
    cams = grad_cam(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 3]))
    assert cams.shape == (2, 2, 2) and float(cams.max()) <= 1  # test_efficientnet: stride 32 at blocks[-1]
