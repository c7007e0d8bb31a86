"""Image encoder: a registered backbone (our small CNN or a timm model after surgery) + a projection.

Backbones are registered by name (``list_image_backbones()``); ``timm:<name>`` builds any other timm
model through the same path. timm models are always built with ``pretrained=False``: weights come
only from a local file (``ModelConfig.pretrained_path``, see :func:`load_local_weights`), loaded into
the timm model *before* surgery so that files saved from a stock timm/torchvision model match (a
file saved from a fedfusion model, whose norm layers are already renamed, is loaded after it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn

from ...config import ImageSpec
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


class SmallCNN(nn.Module):
    """Four 3x3 conv + GroupNorm + ReLU stages (widths 16-32-64-128, stride 2 after the first) and
    global average pooling: ~100k parameters, the fast CPU default for 64x64 grey images."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.GroupNorm(num_groups(width), width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class ImageEncoder(nn.Module):
    """``batch["image"]`` (B, C, H, W) float -> (B, embed_dim): backbone features, then a Linear."""

    def __init__(self, backbone: nn.Module, image: ImageSpec, embed_dim: int, name: str = "backbone") -> None:
        super().__init__()
        self.backbone = backbone
        self.channels, self.size = image.channels, tuple(image.size)
        num_features = _feature_width(backbone, image, name)
        self.proj = nn.Linear(num_features, embed_dim)
        self.out_dim = embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        image = batch["image"]
        if image.ndim != 4 or image.shape[1] != self.channels or tuple(image.shape[2:]) != self.size:
            raise ValueError(
                f"batch['image'] has shape {tuple(image.shape)}; the schema expects "
                f"(B, {self.channels}, {self.size[0]}, {self.size[1]})"
            )
        return self.proj(self.backbone(image))


def _feature_width(backbone: nn.Module, image: ImageSpec, name: str) -> int:
    """Width of the backbone's pooled output, found by one forward on a 2-image zero batch (this
    also fails early, with the backbone named, when the image size is too small for it)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, image.channels, *image.size))
    except (RuntimeError, AssertionError, ValueError) as err:  # timm asserts on sizes
        raise ValueError(
            f"image backbone '{name}' cannot encode {image.channels}x{image.size} images: {err}"
        ) from err
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"image backbone '{name}' must return (B, features), got shape {tuple(out.shape)}")
    return int(out.shape[1])


def build_image_encoder(name: str, image: ImageSpec, embed_dim: int, pretrained_path: str | None = None
                        ) -> ImageEncoder:
    """Build the encoder for backbone ``name`` (registered, or ``timm:<any timm model>``)."""
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        backbone = build_timm_backbone(timm_name, image, pretrained_path, probe=True)
    else:
        backbone = get_image_backbone(name)(image, pretrained_path)
    return ImageEncoder(backbone, image, embed_dim, name)


@register_image_backbone("cnn_small")
def cnn_small(image: ImageSpec, pretrained_path: str | None = None) -> nn.Module:
    model = SmallCNN(image.channels)
    if pretrained_path:
        load_local_weights(model, pretrained_path, "cnn_small")
    return model


def build_timm_backbone(name: str, image: ImageSpec, pretrained_path: str | None = None,
                        probe: bool = False) -> nn.Module:
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
        state = read_state_dict(pretrained_path)
        try:  # a stock timm/torchvision file: load before surgery renames the norm layers
            _load_state(model, state, Path(pretrained_path), name)
            make_opacus_ready(model)
        except ValueError as err:  # maybe a file saved from a fedfusion backbone (after surgery)
            make_opacus_ready(model)
            try:
                _load_state(model, state, Path(pretrained_path), name)
            except ValueError:
                raise err from None
    else:
        make_opacus_ready(model)
    if probe:
        check_opacus_ready(model, torch.randn(2, image.channels, *image.size), name=f"timm:{name}")
    return model


def _register_timm(name: str) -> None:
    def builder(image: ImageSpec, pretrained_path: str | None = None) -> nn.Module:
        return build_timm_backbone(name, image, pretrained_path)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"timm '{name}' (pretrained=False, num_classes=0) after Opacus surgery."
    register_image_backbone(name)(builder)


for _name in TIMM_BACKBONES:
    _register_timm(_name)


def load_local_weights(model: nn.Module, path: str | Path, name: str = "backbone") -> None:
    """Load a LOCAL weights file into ``model`` strictly (never a download).

    Accepts a raw state_dict or a dict holding one under ``state_dict`` or ``model``; strips
    ``module.``/``backbone.`` prefixes (DataParallel, self-supervised checkpoints); from a whole
    fedfusion model checkpoint only the image backbone (``encoders.image.backbone.*``) is used
    (:func:`build_timm_backbone` then loads it after surgery, where its names fit). For timm models,
    classifier weights in the file are ignored (the backbone has ``num_classes=0``), a 3-channel
    first conv is adapted to the schema's channel count as timm does for ImageNet weights, and a
    ViT position embedding is resampled to the schema's image size. Anything else that does not
    match raises ``ValueError`` naming the file and the first missing/unexpected keys.
    """
    _load_state(model, read_state_dict(path), Path(path), name)


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


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    target = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state = _adapt_to_timm(model, state, target, cfg)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"pretrained_path {path} does not fit image backbone '{name}': "
            f"{len(missing)} missing keys {missing[:_SHOWN]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:_SHOWN]}, {len(mismatched)} shape mismatches {mismatched[:_SHOWN]}. "
            "Was the file saved from a different architecture?"
        )
    model.load_state_dict(state, strict=True)


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
