"""Grad-CAM (Selvaraju et al. 2017) for the image encoder of a :class:`FusionModel`, with torch hooks.

The map of a case is ReLU(sum_k w_k A_k), where A_k are the channels of the target convolution's
output and w_k the spatial mean of the gradient of the explained score with respect to them; it is
resampled (bilinear) onto the input's pixels where each feature-map cell actually looks (measured,
:func:`trace_cell_grid`) and scaled to [0, 1] per case. The explained score is a class logit (the
predicted class, or one class chosen by the caller) or the risk score (survival). Because the image
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CellGrid:
    """Where the target layer's cells sit on the input: cell ``i`` of an axis is centred on pixel
    ``offset + i * stride`` (per axis, ``(y, x)``)."""

    stride: tuple[float, float]
    offset: tuple[float, float]


def grad_cam(model: nn.Module, batch: Mapping[str, torch.Tensor], layer: nn.Module,
             target: int | None = None, key: str = "image",
             backbone: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (B, H, W) in [0, 1] for ``batch`` and the explained class per case (-1: risk).

    ``layer`` is a module inside ``model``'s image encoder (see :func:`find_target_layer`).
    ``target`` picks the explained class for every case (e.g. the positive class of a binary task);
    None explains each case's predicted class. Survival models always explain the risk score. The
    map is resampled onto the input with :func:`trace_cell_grid`'s geometry, not by stretching the
    feature map over the frame (see :func:`cam_to_pixels`). The model is put in eval mode; its
    parameter gradients are cleared afterwards.

    ``key`` is the image modality explained (``image:t1`` for one sequence). With a ``backbone`` shared
    by several sequences (``image-encoders = "shared"``), the layer's output is kept only from the
    backbone call whose input is ``batch[key]``: the backbone runs once per sequence.
    """
    store: dict[str, torch.Tensor] = {}
    image = batch[key].detach().clone().requires_grad_(True)
    current = {"ours": backbone is None}

    def mark(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        current["ours"] = bool(inputs) and inputs[0] is image

    def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if current["ours"]:
            store["activation"] = output

    handles = [layer.register_forward_hook(keep)]
    if backbone is not None:
        handles.append(backbone.register_forward_pre_hook(mark))
    model.eval()
    try:
        with torch.enable_grad():
            outputs = model({**batch, key: image})
            activation = store["activation"]
            if "logits" in outputs:
                logits = outputs["logits"]
                explained = (logits.argmax(dim=1) if target is None
                             else torch.full((logits.shape[0],), int(target), dtype=torch.long))
                score = logits.gather(1, explained[:, None]).sum()
            else:
                explained = torch.full((image.shape[0],), -1)
                score = outputs["risk"].sum()
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    activation, gradient = activation.detach(), gradient.detach()
    grid = (trace_cell_grid(model, image, layer, lambda: model({**batch, key: image.detach()}), within=backbone)
            or stretched_grid(tuple(image.shape[-2:]), tuple(activation.shape[-2:])))
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = cam_to_pixels(cam, tuple(image.shape[-2:]), grid)
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).clamp(0, 1).cpu().numpy(), explained.cpu().numpy()


def trace_cell_grid(model: nn.Module, image: torch.Tensor, layer: nn.Module,
                    forward: Callable[[], object], within: nn.Module | None = None) -> CellGrid | None:
    """Where the cells of ``layer``'s output sit on ``image`` (B, C, H, W), from the layers' geometry.

    Why: stretching an h x w map over the H x W frame (``F.interpolate``, align_corners=False)
    assumes cell ``i`` is centred on pixel ``(i + 0.5) * H / h - 0.5``. Convolutions padded to keep
    their size ("same" padding, as in cnn_small and ResNet) centre it on ``i * H / h`` instead, so the
    stretched map lands ``(H / h - 1) / 2`` pixels right of and below where the evidence is -- 3.5 px
    at 8x8 on 64x64, enough to slide a Grad-CAM off a small nucleus; ConvNeXt's patchify stem and
    unpadded pooling shift it differently. Measuring it from gradients does not work: GroupNorm /
    LayerNorm make every cell depend on every pixel, and learned kernels are not symmetric.

    So ``forward`` (one forward pass of ``model`` on ``image``) is run with hooks on every ``Conv2d``,
    ``MaxPool2d`` and ``AvgPool2d``; following the chain of those whose input has the current size
    (a ResNet shortcut's strided 1x1 conv runs on the block's input, after the block's first conv
    has already shrunk the map, and is skipped), each layer maps its cell ``i`` to input position
    ``i * stride - pad + dilation * (kernel - 1) / 2``, composed down to ``layer``. ``pad`` is read
    from the observed sizes where the module pads itself (timm's ``Conv2dSame``). If the chain does
    not reach ``layer`` (a downsampling this does not know), None: callers fall back to
    :func:`stretched_grid`. ``within`` limits the hooks to ``layer``'s backbone, so that another image
    encoder of a multi-sequence model (run first, on images of the same size) is not followed instead.
    """
    height, width = image.shape[-2:]
    state = {"size": (int(height), int(width)), "stride": [1.0, 1.0], "offset": [0.0, 0.0], "done": False}

    def follow(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if state["done"] or not inputs or inputs[0].dim() != 4 or output.dim() != 4:
            return
        size_in, size_out = tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])
        if size_in != state["size"]:
            return
        for axis in (0, 1):
            kernel, stride, pad, dilation = _geometry(module, axis)
            nominal = (size_in[axis] + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            if nominal != size_out[axis]:  # pads itself ("same" at run time): the left share of the padding
                pad = max((size_out[axis] - 1) * stride + dilation * (kernel - 1) + 1 - size_in[axis], 0) // 2
            state["offset"][axis] += state["stride"][axis] * (dilation * (kernel - 1) / 2 - pad)
            state["stride"][axis] *= stride
        state["size"] = size_out
        state["done"] = module is layer

    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    hooks = [m.register_forward_hook(follow) for m in (within or model).modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    if not state["done"]:
        return None
    return CellGrid(stride=(state["stride"][0], state["stride"][1]), offset=(state["offset"][0], state["offset"][1]))


def stretched_grid(size: tuple[int, int], cells: tuple[int, int]) -> CellGrid:
    """The layout ``F.interpolate(..., align_corners=False)`` assumes: cells tile the frame evenly."""
    strides = (size[0] / cells[0], size[1] / cells[1])
    return CellGrid(stride=strides, offset=((strides[0] - 1) / 2, (strides[1] - 1) / 2))


def _geometry(module: nn.Module, axis: int) -> tuple[int, int, int, int]:
    """(kernel, stride, padding, dilation) of a conv or pooling module along ``axis`` (0 = y)."""

    def pick(value: Any, default: int) -> Any:
        if value is None:
            return default
        return value[axis] if isinstance(value, tuple | list) else value

    kernel = int(pick(module.kernel_size, 1))
    stride = int(pick(module.stride, kernel))
    dilation = int(pick(getattr(module, "dilation", 1), 1))
    padding = pick(module.padding, 0)
    if isinstance(padding, str):  # "same" (stride 1: symmetric up to one pixel) or "valid"
        padding = dilation * (kernel - 1) // 2 if padding == "same" else 0
    return kernel, stride, int(padding), dilation


def cam_to_pixels(cam: torch.Tensor, size: tuple[int, int], grid: CellGrid) -> torch.Tensor:
    """Bilinear resampling of cell maps (B, 1, h, w) to (B, H, W): pixel ``p`` reads the cell
    coordinate ``(p - offset) / stride``; pixels outside the outermost cell centres take the edge
    cell's value."""
    cells = cam.shape[-2:]
    axes = []
    for axis in (0, 1):
        coord = (torch.arange(size[axis], dtype=torch.float32) - grid.offset[axis]) / grid.stride[axis]
        n = cells[axis]
        axes.append(2 * coord / (n - 1) - 1 if n > 1 else torch.zeros_like(coord))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    sample = torch.stack((gx, gy), dim=-1).to(cam)[None].expand(cam.shape[0], -1, -1, -1)
    return F.grid_sample(cam, sample, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


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
