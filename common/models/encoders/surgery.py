"""Model surgery that makes a timm backbone train under Opacus' hooks mode (and average well in FedAvg).

Why it is needed (shared/OPACUS-TIMM.md): ``ModuleValidator.fix`` leaves timm's ``BatchNormAct2d`` in
place (Opacus refuses a trainable layer with buffers), and blocks such as timm's ResNet ``BasicBlock``
do ``x += shortcut`` on the output of a hooked layer, which autograd rejects once Opacus has put a
full backward hook on that layer. :func:`make_opacus_ready` fixes both, in place:

1. every trainable BatchNorm (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and timm's
   ``BatchNormAct2d``/``SyncBatchNormAct``) becomes :class:`NormAct`: an exact ``nn.GroupNorm``
   (groups from :func:`num_groups`) followed by the layer's own drop and activation. The BN affine
   weight/bias are copied into the GroupNorm affine (so a pretrained backbone keeps its learned
   per-channel scale and shift, and timm's zero-init of the last BN in a residual block is kept);
   the BN running statistics are discarded: GroupNorm normalises each sample by its own statistics,
   so pretrained features shift and need fine-tuning;
2. timm norm layers that subclass ``nn.GroupNorm``/``nn.LayerNorm`` with the same maths
   (``GroupNorm``, ``GroupNorm1``, ``LayerNorm`` and their ``...Act`` forms) become the exact torch
   types, because Opacus picks its per-sample-gradient rule by exact type and would otherwise fall
   back to its slower functorch path;
3. every ``inplace`` flag is set to False and gradient checkpointing is switched off (DenseNet's
   ``memory_efficient`` and timm's ``grad_checkpointing`` re-run forwards inside backward, which
   Opacus' hooks cannot follow);
4. blocks known to add residuals in place are re-classed to subclasses whose forward is out of
   place (:data:`_OUT_OF_PLACE`; today timm's ResNet ``BasicBlock`` and ``Bottleneck``, which also
   cover resnet34/50/101, resnext and seresnet).

Modules left on Opacus' functorch fallback (correct, slower): layers with their own raw parameters,
e.g. ViT's ``cls_token``/``pos_embed`` (the whole ``VisionTransformer`` module) and ConvNeXt blocks'
layer-scale ``gamma`` and ``LayerNorm2d``. :func:`check_opacus_ready` runs a forward and backward
with Opacus-style hooks and turns a failure into an actionable error; the image encoder calls it for
``timm:<name>`` backbones, which no test covers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import norm as timm_norm
from timm.layers import norm_act as timm_norm_act
from timm.models import resnet as timm_resnet
from torch import nn


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count for ``channels``: the largest divisor <= ``max_groups`` that leaves at
    least two channels per group (16 -> 8, 24 -> 12, 64 -> 32, 1280 -> 32, 3 -> 1)."""
    upper = max(1, min(max_groups, channels // 2))
    for groups in range(upper, 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class NormAct(nn.Module):
    """An exact torch norm layer (Opacus-supported) followed by dropout-like ``drop`` and ``act``.

    Replaces timm's fused norm-act layers; the norm sits in the child ``norm`` so Opacus hooks it by
    its exact type, while this container has no parameters of its own and is never hooked.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def _group_norm_from(old: nn.Module, channels: int, groups: int | None = None) -> nn.GroupNorm:
    weight, bias = getattr(old, "weight", None), getattr(old, "bias", None)
    device = weight.device if isinstance(weight, torch.Tensor) else None
    eps = float(getattr(old, "eps", 1e-5))
    new = nn.GroupNorm(groups or num_groups(channels), channels, eps=eps, device=device)
    with torch.no_grad():
        if isinstance(weight, torch.Tensor) and weight.shape == new.weight.shape:
            new.weight.copy_(weight.detach())
        if isinstance(bias, torch.Tensor) and bias.shape == new.bias.shape:
            new.bias.copy_(bias.detach())
    return new


def _layer_norm_from(old: nn.LayerNorm) -> nn.LayerNorm:
    new = nn.LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                       bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    return new


def _with_act(norm: nn.Module, old: nn.Module) -> nn.Module:
    drop, act = getattr(old, "drop", None), getattr(old, "act", None)
    if isinstance(drop, nn.Identity):
        drop = None
    if isinstance(act, nn.Identity):
        act = None
    return norm if drop is None and act is None else NormAct(norm, drop, act)


_TIMM_GROUP_NORMS = (timm_norm.GroupNorm, timm_norm.GroupNorm1, timm_norm_act.GroupNormAct,
                     timm_norm_act.GroupNorm1Act)
_TIMM_LAYER_NORMS = (timm_norm.LayerNorm, timm_norm_act.LayerNormAct)


def _replacement(module: nn.Module) -> nn.Module | None:
    """The Opacus-ready stand-in for one norm layer, or None to keep it."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _with_act(_group_norm_from(module, module.num_features), module)
    if type(module) in _TIMM_GROUP_NORMS:
        return _with_act(_group_norm_from(module, module.num_channels, module.num_groups), module)
    if type(module) in _TIMM_LAYER_NORMS:
        return _with_act(_layer_norm_from(module), module)
    return None


def _replace_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        new = _replacement(child)
        if new is None:
            _replace_norms(child)
        else:
            setattr(module, name, new)


class _OutOfPlaceBasicBlock(timm_resnet.BasicBlock):
    """timm ``BasicBlock`` with ``x = x + shortcut`` instead of ``x += shortcut``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class _OutOfPlaceBottleneck(timm_resnet.Bottleneck):
    """timm ``Bottleneck`` with ``x = x + shortcut`` instead of ``x += shortcut``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


#: block class -> subclass with an out-of-place forward (same attributes, same state_dict names).
_OUT_OF_PLACE: dict[type, type] = {
    timm_resnet.BasicBlock: _OutOfPlaceBasicBlock,
    timm_resnet.Bottleneck: _OutOfPlaceBottleneck,
}


def make_opacus_ready(model: nn.Module) -> nn.Module:
    """Apply the surgery described in the module docstring to ``model`` in place and return it."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)
    _replace_norms(model)
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
        if isinstance(getattr(module, "grad_checkpointing", None), bool):
            module.grad_checkpointing = False
        if isinstance(getattr(module, "memory_efficient", None), bool):
            module.memory_efficient = False
        fixed = _OUT_OF_PLACE.get(type(module))
        if fixed is not None:
            module.__class__ = fixed
    return model


def check_opacus_ready(model: nn.Module, example: torch.Tensor, name: str = "backbone") -> None:
    """Fail with an actionable ``ValueError`` if ``model`` cannot produce per-sample gradients.

    Checks what ``ModuleValidator.validate`` and ``GradSampleModule.validate`` check (e.g. no
    BatchNorm, no trainable layer with buffers), then runs one forward and backward on ``example``
    with a full backward hook on every module that owns trainable parameters, exactly where
    Opacus' hooks mode puts them: an in-place op on such a module's output fails here as it would
    in DP training.
    Parameters' ``.grad`` are restored afterwards.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False) + GradSampleModule.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e).strip().splitlines()[0][:240] for e in errors[:3])
        raise ValueError(f"{name} cannot train under Opacus ({len(errors)} problems): {details}")
    hooked = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    handles = [m.register_full_backward_hook(lambda *_: None) for m in hooked]
    saved = {p: p.grad for p in model.parameters()}
    try:
        out = model(example.detach().requires_grad_(True))
        F.softplus(out).sum().backward()
    except RuntimeError as err:
        raise ValueError(
            f"{name} cannot train under Opacus' hooks mode: {err}. Usually a block modifies a layer's output "
            "in place (e.g. `x += shortcut`); add an out-of-place subclass to _OUT_OF_PLACE in "
            "common/models/encoders/surgery.py, or pick a backbone from list_image_backbones()"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in saved.items():
            p.grad = grad
