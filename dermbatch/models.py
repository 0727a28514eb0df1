"""Model factory: architecture name -> constructor, for both tasks, with errors that list valid names."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from dermbatch.bundle import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Bundle,
    CropSpec,
    ModelSpec,
    build_manifest,
    load_bundle,
    save_weights,
    write_manifest,
)
from dermbatch.errors import BundleError

log = logging.getLogger(__name__)

# segmentation_models_pytorch class names; the encoder can be any smp encoder or "tu-<timm name>".
SEG_ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "linknet": "Linknet",
    "deeplabv3plus": "DeepLabV3Plus",
}


def _build_smp(spec: ModelSpec, num_classes: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    cls = getattr(smp, SEG_ARCHITECTURES[spec.architecture])
    return cls(encoder_name=spec.encoder, encoder_weights=None, in_channels=3, classes=1)


def _build_timm(spec: ModelSpec, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(spec.encoder, pretrained=False, num_classes=num_classes)


class MultiStageClassifier(nn.Module):
    """A timm EfficientNet-style model whose linear classifier reads, for every block stage and the head
    convolution, the spatial mean and standard deviation of each channel, concatenated.

    Means and standard deviations of mid-level channels are colour and texture statistics, which dermoscopy
    turns on; with the backbone kept at its ImageNet weights (``dermbatch train --frozen-backbone``) only
    ``classifier`` is learnt.
    """

    def __init__(self, encoder: str, num_classes: int):
        import timm

        super().__init__()
        self.backbone = timm.create_model(encoder, pretrained=False, num_classes=0)
        missing = [a for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2") if not hasattr(self.backbone, a)]
        if missing:
            raise ValueError(f"{encoder} has no {missing[0]}; timm-multistage needs an EfficientNet-style model")
        with torch.no_grad():  # the width of the pooled features, whatever the encoder
            self.num_features = self.features(torch.zeros(1, 3, 64, 64)).shape[1]
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_features): per stage, the channels' spatial means, then their std."""
        return self.features_from(*self.trunk(x, len(self.backbone.blocks)), len(self.backbone.blocks))

    def trunk(self, x: torch.Tensor, stages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem and the first ``stages`` block stages: (their output, their pooled statistics)."""
        b = self.backbone
        x = b.bn1(b.conv_stem(x))
        pooled = []
        for block in b.blocks[:stages]:
            x = block(x)
            pooled += [x.mean((2, 3)), x.std((2, 3))]
        return x, torch.cat(pooled, 1) if pooled else x.new_zeros(len(x), 0)

    def features_from(self, x: torch.Tensor, pooled: torch.Tensor, stage: int) -> torch.Tensor:
        """The features from the output ``x`` of stage ``stage - 1`` and the statistics ``pooled`` of the stages
        before it (``trunk``'s two results): ``features(x) == features_from(*trunk(x, k), k)`` for every k."""
        b = self.backbone
        parts = [pooled]
        for block in b.blocks[stage:]:
            x = block(x)
            parts += [x.mean((2, 3)), x.std((2, 3))]
        x = b.bn2(b.conv_head(x))
        parts += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SharedBackboneFolds(nn.Module):
    """Fold models whose backbones agree up to some depth: that part once, then each fold's own rest. A frozen
    shared backbone (``--frozen-backbone``) agrees everywhere: the features once, then each fold's classifier;
    ``--tune-stages K`` folds agree on the stem and stages 0..K-1: those once, then each fold's stages and head.

    ``forward`` returns the folds' logits stacked, (F, N, K), as running every fold would.
    """

    def __init__(self, models: list[MultiStageClassifier]):
        super().__init__()
        self.folds = nn.ModuleList(models)
        self.stages = shared_stages(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.folds[0]
        if self.stages > len(first.backbone.blocks):  # the whole backbone, head included
            features = first.features(x)
            return torch.stack([model.classifier(features) for model in self.folds])
        out, pooled = first.trunk(x, self.stages)
        return torch.stack([model.classifier(model.features_from(out, pooled, self.stages)) for model in self.folds])


def _same(modules: list[nn.Module]) -> bool:
    first, *others = (m.state_dict() for m in modules)
    return all(first.keys() == o.keys() and all(torch.equal(first[k], v) for k, v in o.items()) for o in others)


def shared_stages(models: list[nn.Module]) -> int | None:
    """How many leading block stages two or more multistage classifiers share after their shared stem (identical
    weights), one more when the head convolution is shared as well; None when not even the stem is."""
    if len(models) < 2 or not all(isinstance(m, MultiStageClassifier) for m in models):
        return None
    backbones = [m.backbone for m in models]
    if not (_same([b.conv_stem for b in backbones]) and _same([b.bn1 for b in backbones])):
        return None
    stages = 0
    while stages < len(backbones[0].blocks) and _same([b.blocks[stages] for b in backbones]):
        stages += 1
    if stages == len(backbones[0].blocks) and _same([b.conv_head for b in backbones]) \
            and _same([b.bn2 for b in backbones]):
        stages += 1
    return stages


def shares_backbone(models: list[nn.Module]) -> bool:
    """True for two or more multistage classifiers that share at least their stem."""
    return shared_stages(models) is not None


def _build_multistage(spec: ModelSpec, num_classes: int) -> nn.Module:
    return MultiStageClassifier(spec.encoder, num_classes)


_BUILDERS: dict[str, dict[str, Callable[[ModelSpec, int], nn.Module]]] = {
    "segmentation": {name: _build_smp for name in SEG_ARCHITECTURES},
    "classification": {"timm": _build_timm, "timm-multistage": _build_multistage},
}


def build_model(spec: ModelSpec, num_classes: int = 7) -> nn.Module:
    """A randomly initialised model for ``spec`` (weights come from the bundle or the trainer)."""
    builders = _BUILDERS[spec.task]
    if spec.architecture not in builders:
        raise BundleError(f"{spec.task}.architecture {spec.architecture!r} is unknown; "
                          f"valid: {', '.join(sorted(builders))}")
    try:
        return builders[spec.architecture](spec, num_classes)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{spec.task}: cannot build {spec.architecture} with encoder {spec.encoder!r} "
                          f"({str(exc).strip() or type(exc).__name__})") from None


LOW_RANK = (".lora_a", ".lora_b")


def merge_low_rank(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold low-rank updates into their 1x1 convolutions: ``W += lora_b @ lora_a`` for every ``<conv>.lora_a``
    (r, in) and ``<conv>.lora_b`` (out, r) beside ``<conv>.weight`` (out, in, 1, 1). A fold trained with
    ``dermbatch train --tune-stages`` stores only such updates (and its batch-norm scales), so five folds fit
    in a few MB over the shared ImageNet backbone; the model that runs is an ordinary one."""
    merged = {k: v for k, v in state.items() if not k.endswith(LOW_RANK)}
    for key in [k for k in state if k.endswith(".lora_a")]:
        base = key[: -len(".lora_a")]
        a, b, weight = state[key], state.get(base + ".lora_b"), merged.get(base + ".weight")
        if b is None or weight is None or weight.shape[2:] != (1, 1) or b.shape[1] != a.shape[0] \
                or weight.shape[:2] != (b.shape[0], a.shape[1]):
            raise BundleError(f"{base}: low-rank update does not fit its convolution")
        merged[base + ".weight"] = weight + (b.float() @ a.float()).reshape(weight.shape).to(weight.dtype)
    if any(k.endswith(".lora_b") and k[:-7] + ".lora_a" not in state for k in state):
        raise BundleError("a low-rank update has lora_b without lora_a")
    return merged


def load_fold_model(bundle: Bundle, task: str, fold: int) -> nn.Module:
    """Build the fold's model, load its verified weights strictly (low-rank updates merged), eval mode."""
    spec = bundle.spec(task)
    model = build_model(spec, num_classes=len(bundle.classes))
    state = merge_low_rank(bundle.read_weights(task, fold))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"{bundle.path / spec.weight_file(fold)}: weights do not fit "
                          f"{spec.architecture}/{spec.encoder} ({first})") from None
    return model.eval()


@torch.no_grad()
def random_state_dict(spec: ModelSpec, num_classes: int = 7, seed: int = 0) -> dict:
    """State dict of a seeded random model: used for tests and benchmarks that need real-size models."""
    torch.manual_seed(seed)
    return build_model(spec, num_classes).state_dict()


def default_specs(folds: int = 5, tta: str = "flip") -> tuple[ModelSpec, ModelSpec]:
    """The default architecture: EfficientNet-Lite0 U-Net at 256 px and EfficientNet-Lite0 classifier at 224 px."""
    seg = ModelSpec("segmentation", "unet", "tu-tf_efficientnet_lite0", (256, 256), IMAGENET_MEAN, IMAGENET_STD,
                    tuple(range(folds)), tta=tta)
    cls = ModelSpec("classification", "timm", "tf_efficientnet_lite0", (224, 224), IMAGENET_MEAN, IMAGENET_STD,
                    tuple(range(folds)), tta=tta)
    return seg, cls


def create_random_bundle(root, segmentation: ModelSpec, classification: ModelSpec, crop: CropSpec | None = None,
                         name: str = "random", seed: int = 0, half: bool = False) -> Bundle:
    """A complete bundle of seeded, randomly initialised models (for tests, benchmarks and dry runs).

    Its predictions mean nothing; its shapes, sizes and speed are those of the real architecture.
    """
    weights = {}
    for offset, spec in enumerate((segmentation, classification)):
        for fold in spec.folds:
            state = random_state_dict(spec, seed=seed + 100 * offset + fold)
            file_name, digest = save_weights(root, spec.task, fold, state, half=half)
            weights[file_name] = digest
    manifest = build_manifest(segmentation, classification, crop or CropSpec(), weights, name,
                              provenance={"kind": "random-init", "seed": seed})
    write_manifest(root, manifest)
    return load_bundle(root)
