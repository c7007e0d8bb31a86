"""Grad-CAM (Selvaraju et al. 2017) for the image encoder of a :class:`FusionModel`, with torch hooks.

The map of a case is ReLU(sum_k w_k A_k), where A_k are the channels of the target convolution's
output and w_k the spatial mean of the gradient of the explained score with respect to them; it is
upsampled (bilinear) to the schema's image size and scaled to [0, 1] per case. The explained score
is the predicted class's logit (classification) or the risk score (survival). Because the image
embedding passes through the fusion, the map shows where the image evidence *that reached the
prediction* came from.

Target layer: the last ``Conv2d`` (in execution order) whose output still has more than one pixel,
found by one forward pass of a blank image. That is the last conv stage of ``cnn_small`` and of
timm CNNs (ResNet, DenseNet, EfficientNet, ConvNeXt, ...), and it skips MobileNetV3's ``conv_head``,
which runs after global pooling. Vision transformers have no such layer (their only conv is the
patch embedding, before any attention): :func:`find_target_layer` returns None and callers skip
Grad-CAM with a note -- attention rollout would be the tool there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def is_transformer(backbone: nn.Module) -> bool:
    """A ViT-style backbone (patch embedding + attention blocks): Grad-CAM does not apply."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def find_target_layer(backbone: nn.Module, channels: int, size: tuple[int, int]) -> tuple[str, nn.Module] | None:
    """(name, module) of the last spatial ``Conv2d`` of ``backbone``; None for transformers or no conv."""
    if is_transformer(backbone):
        return None
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, n=name: seen.append((n, m, tuple(o.shape))))
             for name, module in backbone.named_modules() if isinstance(module, nn.Conv2d)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, channels, *size))
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    spatial = [(name, module) for name, module, shape in seen if len(shape) == 4 and shape[2] * shape[3] > 1]
    return spatial[-1] if spatial else None


def grad_cam(model: nn.Module, batch: Mapping[str, torch.Tensor], layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (B, H, W) in [0, 1] for ``batch`` and the explained class per case (-1: risk).

    ``layer`` is a module inside ``model``'s image encoder (see :func:`find_target_layer`). The model
    is put in eval mode; its parameter gradients are cleared afterwards.
    """
    store: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        store["activation"] = output
        output.register_hook(lambda grad: store.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(keep)
    model.eval()
    try:
        with torch.enable_grad():
            outputs = model(batch)
            if "logits" in outputs:
                target = outputs["logits"].argmax(dim=1)
                score = outputs["logits"].gather(1, target[:, None]).sum()
            else:
                target = torch.full((batch["mask"].shape[0],), -1)
                score = outputs["risk"].sum()
            score.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    activation, gradient = store["activation"].detach(), store["gradient"].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    size = tuple(batch["image"].shape[-2:])
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).clamp(0, 1).cpu().numpy(), target.cpu().numpy()


def cam_centroid(cam: np.ndarray) -> tuple[float, float]:
    """Centre of mass (x, y) of a map in pixels; the image centre when the map is empty."""
    total = float(cam.sum())
    h, w = cam.shape
    if total <= 0:
        return (w - 1) / 2, (h - 1) / 2
    yy, xx = np.mgrid[:h, :w]
    return float((xx * cam).sum() / total), float((yy * cam).sum() / total)


def save_overlay(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> Path:
    """PNG: the input image (first channel or RGB) beside it with the map overlaid."""
    shown = image[0] if image.shape[0] == 1 else np.transpose(image[:3], (1, 2, 0))
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(5.6, 3.0))
    for ax in axes:
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        ax.axis("off")
    axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=9)
    axes[1].set_title("Grad-CAM", fontsize=9)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
