"""Image encoder: a registered backbone (our small CNN or a timm model after surgery) + a projection.

Backbones are registered by name (``list_image_backbones()``); ``timm:<name>`` builds any other timm
model through the same path. timm models are always built with ``pretrained=False``: weights come
only from a local file (``ModelConfig.pretrained_path``, see :func:`load_local_weights`), loaded into
the timm model *before* surgery so that files saved from a stock timm/torchvision model match (a
file saved from a fedfusion model, whose norm layers are already renamed, is loaded after it).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn

from ...config import ConfigError, ImageSpec
from ..registry import TIMM_PREFIX, get_image_backbone, register_image_backbone
from .surgery import check_opacus_ready, make_opacus_ready, num_groups

#: timm backbones registered by name; ViTs also get ``img_size`` from the schema.
TIMM_BACKBONES = (
    "resnet18",
    "densenet121",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "vit_tiny_patch16_224",
)
_WRAPPERS = ("module.", "_module.")  # DataParallel/DDP, Opacus GradSampleModule
_FEDFUSION_BACKBONE = "encoders.image.backbone."  # a whole FusionModel checkpoint
_SHOWN = 10
_ENCODER = "encoder."
_HEADS = ("fc.", "head.", "classifier.", "head_drop.")  # classification layers a backbone does not have


def conv_gn_stages(conv: type[nn.Module], in_chans: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """Conv (3, stride 2 after the first) + GroupNorm + ReLU per width, for 2D or 3D ``conv``.

    GroupNorm, not BatchNorm: per-sample statistics work under Opacus and average cleanly in FedAvg.
    Returns the stages and their output channels; stage ``i`` starts at ``features.{3 * i}``.
    """
    layers: list[nn.Module] = []
    channels = in_chans
    for i, width in enumerate(widths):
        layers += [conv(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.GroupNorm(num_groups(width), width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers), channels


class SmallCNN(nn.Module):
    """Four 3x3 conv + GroupNorm + ReLU stages (widths 16-32-64-128, stride 2 after the first) and
    global average pooling: ~100k parameters, the fast CPU default for 64x64 grey images."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.features, self.num_features = conv_gn_stages(nn.Conv2d, in_chans, widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.block_names = [f"features.{3 * i}" for i in range(len(widths))]  # one stage per conv (freezing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class ImageEncoder(nn.Module):
    """``batch[key]`` (B, C, H, W) float -> (B, embed_dim): backbone features, then a Linear.

    ``key`` is the image modality (``image``, or ``image:t1`` for one sequence of a multi-sequence
    schema). For a schema with ``image.depth`` > 0 the input is a volume (B, C, D, H, W) and the
    backbone must be volumetric (its ``volumetric`` attribute is True, e.g. ``cnn3d_small``).
    """

    def __init__(self, backbone: nn.Module, image: ImageSpec, embed_dim: int, name: str = "backbone",
                 key: str = "image") -> None:
        super().__init__()
        self.key = key
        if image.depth and not getattr(backbone, "volumetric", False):
            raise ConfigError(f"model: image backbone '{name}' encodes 2-D images but the schema's images are "
                              f"volumes (depth {image.depth}); use a 3-D backbone such as 'cnn3d_small'")
        self.backbone = backbone
        self.channels, self.size = image.channels, tuple(image.size)
        self.shape = image.shape
        num_features = _feature_width(backbone, image, name)
        self.proj = nn.Linear(num_features, embed_dim)
        self.out_dim = embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch, self.key)

    def encode(self, batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        image = batch[key]
        if tuple(image.shape[1:]) != self.shape:
            raise ValueError(
                f"batch['{key}'] has shape {tuple(image.shape)}; the schema expects "
                f"(B, {', '.join(str(s) for s in self.shape)})"
            )
        return self.proj(self.backbone(image))


class SharedImageEncoder(ImageEncoder):
    """One backbone + projection for every sequence of a multi-sequence schema, plus a learned
    per-sequence embedding added to the projection, so the fusion can tell T1 from FLAIR.

    Sharing trades per-sequence specialisation for 1/S of the parameters and S times the training
    images per parameter: the better choice for small sites. ``encode(batch, "image:t1")`` gives one
    sequence's (B, embed_dim) embedding; the backbone runs once per sequence, so every parameter
    (and every row of the sequence embedding) takes part in every step, as Opacus needs. Its
    parameters are ``encoders.image.*`` (group ``image``): a checkpoint or pretrained file for a
    one-image model fits its backbone unchanged.
    """

    def __init__(self, backbone: nn.Module, specs: Mapping[str, ImageSpec], embed_dim: int,
                 name: str = "backbone") -> None:
        shapes = {m: spec.shape for m, spec in specs.items()}
        if len(set(shapes.values())) != 1:
            raise ConfigError(f"model: image-encoders = \"shared\" needs every image sequence in the same shape "
                              f"(channels, depth, size); the schema has {shapes}. Use \"separate\" or resize")
        first = next(iter(specs.values()))
        super().__init__(backbone, first, embed_dim, name, key="")
        self.sequences = tuple(specs)
        self.sequence = nn.Embedding(len(self.sequences), embed_dim)
        nn.init.normal_(self.sequence.weight, std=0.02)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise TypeError("a shared image encoder encodes one sequence at a time: call encode(batch, modality)")

    def encode(self, batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        features = super().encode(batch, key)
        index = torch.full((features.shape[0],), self.sequences.index(key), dtype=torch.long, device=features.device)
        return features + self.sequence(index)


def _feature_width(backbone: nn.Module, image: ImageSpec, name: str) -> int:
    """Width of the backbone's pooled output, found by one forward on a 2-image zero batch (this
    also fails early, with the backbone named, when the image size is too small for it)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, *image.shape))
    except (RuntimeError, AssertionError, ValueError) as err:  # timm asserts on sizes
        raise ValueError(
            f"image backbone '{name}' cannot encode {image.channels}x{image.size} images: {err}"
        ) from err
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"image backbone '{name}' must return (B, features), got shape {tuple(out.shape)}")
    return int(out.shape[1])


def build_image_encoder(name: str, image: ImageSpec, embed_dim: int, pretrained_path: str | None = None,
                        *, min_fraction: float = 1.0, key: str = "image") -> ImageEncoder:
    """Build the encoder for backbone ``name`` (registered, or ``timm:<any timm model>``) reading ``batch[key]``.

    ``min_fraction`` < 1 accepts a weights file that fits the backbone only partly (see
    :func:`load_local_weights`); it is passed to registered builders only when it is not 1.
    """
    backbone = build_image_backbone(name, image, pretrained_path, min_fraction=min_fraction)
    return ImageEncoder(backbone, image, embed_dim, name, key=key)


def build_shared_image_encoder(name: str, specs: Mapping[str, ImageSpec], embed_dim: int,
                               pretrained_path: str | None = None, *, min_fraction: float = 1.0
                               ) -> SharedImageEncoder:
    """One encoder for all image sequences (``image-encoders = "shared"``), see :class:`SharedImageEncoder`."""
    backbone = build_image_backbone(name, next(iter(specs.values())), pretrained_path, min_fraction=min_fraction)
    return SharedImageEncoder(backbone, specs, embed_dim, name)


def build_image_backbone(name: str, image: ImageSpec, pretrained_path: str | None = None,
                         *, min_fraction: float = 1.0) -> nn.Module:
    """The backbone alone: a registered builder, any timm model as ``timm:<name>``, or slice pooling over
    any 2-D backbone as ``slices:<name>`` / ``slices_mean:<name>`` (see ``encoders/slices.py``)."""
    from .slices import SLICE_PREFIXES, build_slice_pooling

    for prefix, pooling in SLICE_PREFIXES.items():
        if name.startswith(prefix):
            return build_slice_pooling(name[len(prefix):], image, pooling, pretrained_path, min_fraction)
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        backbone = build_timm_backbone(timm_name, image, pretrained_path, probe=True, min_fraction=min_fraction)
    else:
        builder = get_image_backbone(name)
        extra = {"min_fraction": min_fraction} if pretrained_path and min_fraction < 1.0 else {}
        backbone = builder(image, pretrained_path, **extra)
    return backbone


@register_image_backbone("cnn_small")
def cnn_small(image: ImageSpec, pretrained_path: str | None = None, min_fraction: float = 1.0) -> nn.Module:
    model = SmallCNN(image.channels)
    if pretrained_path:
        load_local_weights(model, pretrained_path, "cnn_small", min_fraction=min_fraction)
    return model


def build_timm_backbone(name: str, image: ImageSpec, pretrained_path: str | None = None,
                        probe: bool = False, min_fraction: float = 1.0) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, in_chans=C)``, local weights, surgery.

    ``img_size`` from the schema is passed to models that take it (ViTs and other token models);
    ``probe=True`` runs :func:`check_opacus_ready` on the result (used for unregistered names).
    """
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"'{name}' is not a timm model name (see timm.list_models())")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": image.channels}
    try:
        model = timm.create_model(name, img_size=tuple(image.size), **kwargs)
    except TypeError as err:  # the model's constructor has no img_size argument (CNNs)
        if "img_size" not in str(err):
            raise
        model = timm.create_model(name, **kwargs)
    if pretrained_path:
        # A stock timm/torchvision file fits before surgery renames the norm layers; a file saved from
        # a fedfusion backbone fits after it. Load whichever way more of the file's tensors fit.
        state = read_state_dict(pretrained_path)
        operated = copy.deepcopy(model)
        make_opacus_ready(operated)
        before, after = _plan(model, state), _plan(operated, state)
        if not before.complete and (after.complete or len(after.loadable) > len(before.loadable)):
            model = operated
            _apply(model, after, Path(pretrained_path), name, min_fraction)
        else:
            _apply(model, before, Path(pretrained_path), name, min_fraction)
            make_opacus_ready(model)
    else:
        make_opacus_ready(model)
    if probe:
        check_opacus_ready(model, torch.randn(2, image.channels, *image.size), name=f"timm:{name}")
    return model


def _register_timm(name: str) -> None:
    def builder(image: ImageSpec, pretrained_path: str | None = None, min_fraction: float = 1.0) -> nn.Module:
        return build_timm_backbone(name, image, pretrained_path, min_fraction=min_fraction)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"timm '{name}' (pretrained=False, num_classes=0) after Opacus surgery."
    register_image_backbone(name)(builder)


for _name in TIMM_BACKBONES:
    _register_timm(_name)


def load_local_weights(model: nn.Module, path: str | Path, name: str = "backbone", *,
                       min_fraction: float = 1.0) -> None:
    """Load a LOCAL weights file into ``model`` (never a download); strictly when ``min_fraction`` is 1.

    Accepts a raw state_dict or a dict holding one under ``state_dict`` or ``model``; strips
    ``module.``/``backbone.`` prefixes (DataParallel, self-supervised checkpoints) and an
    ``encoder.`` prefix shared by every key; classifier keys (``fc.``, ``head.``, ``classifier.``)
    the model lacks are dropped. From a whole
    fedfusion model checkpoint only the image backbone (``encoders.image.backbone.*``) is used
    (:func:`build_timm_backbone` then loads it after surgery, where its names fit). For timm models,
    classifier weights in the file are ignored (the backbone has ``num_classes=0``), a 3-channel
    first conv is adapted to the schema's channel count as timm does for ImageNet weights, and a
    ViT position embedding is resampled to the schema's image size. Anything else that does not
    match raises ``ValueError`` naming the file and the first missing/unexpected keys.

    With ``min_fraction`` < 1 a partly fitting file is accepted when at least that fraction of the
    model's tensors (parameters and buffers) loaded; the rest keep their initialisation and a
    ``UserWarning`` lists them. Below the fraction the error says how many loaded.
    """
    _apply(model, _plan(model, read_state_dict(path)), Path(path), name, min_fraction)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file into a flat state_dict (see :func:`load_local_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained_path {path}: file not found (weights are only read from local files)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or non-tensor files
        raise ValueError(f"pretrained_path {path}: not a weights file torch.load(weights_only=True) can read "
                         f"({type(err).__name__}: {err})") from err
    return _unwrap_state_dict(raw, path)


@dataclass
class _LoadPlan:
    """How a state_dict fits a model: what can load, and what does not fit (for the report)."""

    loadable: dict[str, torch.Tensor]
    total: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        return (f"{len(self.missing)} missing keys {self.missing[:_SHOWN]}, {len(self.unexpected)} unexpected keys "
                f"{self.unexpected[:_SHOWN]}, {len(self.mismatched)} shape mismatches {self.mismatched[:_SHOWN]}")


def _plan(model: nn.Module, state: dict[str, torch.Tensor]) -> _LoadPlan:
    target = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state = _adapt_to_timm(model, state, target, cfg)
    state = {k: v for k, v in state.items() if k in target or not k.startswith(_HEADS)}
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in state if k in target and state[k].shape != target[k].shape]
    return _LoadPlan(
        loadable={k: v for k, v in state.items() if k in target and v.shape == target[k].shape},
        total=len(target),
        missing=[k for k in target if k not in state],
        unexpected=[k for k in state if k not in target],
        mismatched=mismatched,
    )


def _apply(model: nn.Module, plan: _LoadPlan, path: Path, name: str, min_fraction: float) -> None:
    """Load ``plan`` into ``model``: strictly, or partly when ``min_fraction`` < 1 allows it."""
    if plan.complete:
        model.load_state_dict(plan.loadable, strict=True)
        return
    loaded = len(plan.loadable)
    if min_fraction >= 1.0 or loaded < min_fraction * plan.total:
        allowed = "" if min_fraction >= 1.0 else f" (pretrained-min-fraction = {min_fraction})"
        raise ValueError(
            f"pretrained_path {path} does not fit image backbone '{name}': only {loaded} of {plan.total} "
            f"backbone tensors would load{allowed}; {plan.describe()}. "
            "Was the file saved from a different architecture?"
        )
    model.load_state_dict(plan.loadable, strict=False)
    warnings.warn(f"pretrained_path {path}: loaded {loaded} of {plan.total} tensors of image backbone '{name}'; "
                  f"the rest keep their random initialisation: {plan.describe()}", UserWarning, stacklevel=3)


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"pretrained_path {path}: expected a state_dict (names -> tensors), "
                         "or a dict holding one under 'state_dict' or 'model'")
    state = {_strip(str(k), _WRAPPERS): v for k, v in raw.items()}
    if state and all(k.startswith(_ENCODER) for k in state):  # e.g. MAE/SimCLR-style encoder checkpoints
        state = {k[len(_ENCODER):]: v for k, v in state.items()}
    prefix = _FEDFUSION_BACKBONE
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {_strip(k, (*_WRAPPERS, "backbone.")): v for k, v in state.items()}


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    while key.startswith(prefixes):
        key = key.split(".", 1)[1]
    return key


def _adapt_to_timm(model: nn.Module, state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                   cfg: Mapping) -> dict[str, torch.Tensor]:
    """Drop classifier weights, adapt the input conv's channels and resample ViT position embeddings."""
    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items()
             if k in target or not any(k.startswith(c + ".") for c in classifiers)}
    first_conv = cfg.get("first_conv")
    first_convs = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
    for conv in first_convs:
        key = f"{conv}.weight"
        if key not in state or key not in target:
            continue
        have, want = state[key], target[key]
        if have.ndim == 4 and have.shape != want.shape and have.shape[0] == want.shape[0]:
            state[key] = adapt_input_conv(want.shape[1], have.float()).to(want.dtype)
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            state["pos_embed"] = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=prefix)
    return state
