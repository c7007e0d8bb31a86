"""Freezing for transfer learning: train the whole image backbone, none of it, or only its last blocks.

Sites in the studies this product serves have a few hundred patients each, so fine-tuning only the
top of a pretrained backbone (or none of it) is often what generalises. Freezing is part of the
model's definition (``ModelConfig``), applied by ``create_model`` at the coordinator and at every
site alike; frozen tensors still travel in the model's arrays (FedAvg of identical values is a
no-op), they are just never given to the optimiser (``training.make_optimizer``) nor to Opacus,
which only computes per-sample gradients for parameters that require them.

What a "block" is, in order of preference:

1. ``backbone.block_names`` (our own CNNs list their stages);
2. timm's ``feature_info`` modules (the stages where resolution drops: ResNet ``layer1..4``,
   ConvNeXt ``stages.0..3``, ViT ``blocks.0..11``), skipping entries without parameters;
3. the backbone's top-level children that hold parameters.

"Train the last N blocks" trains every parameter from the first one of block ``-N`` on, in
registration order, so layers after the last stage (final norms, ``conv_head``) train too.
"""

from __future__ import annotations

from torch import nn

from ..config import ConfigError


def backbone_blocks(backbone: nn.Module) -> list[str]:
    """Module names of ``backbone``'s blocks/stages, input side first (see module docstring)."""
    names = getattr(backbone, "block_names", None)
    if names is None:
        info = getattr(backbone, "feature_info", None)
        if info is not None:
            names = [f["module"] for f in info if isinstance(f, dict) and "module" in f]
        else:
            names = [n for n, _ in backbone.named_children()]
    modules = dict(backbone.named_modules())
    unique = list(dict.fromkeys(names))
    return [n for n in unique if n in modules and any(True for _ in modules[n].parameters())]


def freeze_image_backbone(backbone: nn.Module, *, freeze: bool, trainable_blocks: int, name: str = "backbone"
                          ) -> None:
    """Set ``requires_grad`` on ``backbone``'s parameters as ``freeze``/``trainable_blocks`` say.

    ``trainable_blocks`` > 0 freezes everything before the last N blocks (whatever ``freeze`` says);
    ``freeze`` alone freezes the whole backbone; neither leaves it fully trainable.
    """
    if trainable_blocks <= 0:
        if freeze:
            backbone.requires_grad_(False)
        return
    blocks = backbone_blocks(backbone)
    if trainable_blocks > len(blocks):
        raise ConfigError(f"model: trainable-blocks = {trainable_blocks} but image backbone '{name}' has "
                          f"{len(blocks)} blocks {blocks}; use at most {len(blocks)}, or 0 with "
                          "freeze-backbone = false to train all of it")
    first = blocks[-trainable_blocks] + "."
    trainable = False
    for param_name, param in backbone.named_parameters():
        trainable = trainable or param_name.startswith(first)
        param.requires_grad_(trainable)
