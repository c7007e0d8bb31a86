"""``FusionModel`` and ``create_model(schema, cfg)``, the only way to build one (DESIGN.md §4).

Parameter names reveal the group the federation averages them in (:func:`parameter_group`):

=====================================  =========================================================
name prefix                            group
=====================================  =========================================================
``encoders.<modality>.``               ``<modality>`` (image, image:<seq>, clinical, omics)
``absent.<modality>.``                 ``fusion`` (learned stand-in for a missing modality)
``heads.<task>.per_modality.<m>.``     ``<m>`` (``late`` fusion's per-modality heads)
``fusion.``                            ``fusion``
``heads.<task>.``                      ``head``
=====================================  =========================================================

``absent.<m>`` is trained by the samples that LACK modality m (and by modality dropout), so it is
shared: a site without omics is exactly the site that trains ``absent.omics``; grouping it with
omics would discard that site's update for it.

Multi-sequence schemas (``Schema.images``) have one modality per sequence (``image:t1``, ...). With
``image-encoders = "separate"`` each has its own ``encoders.image:<seq>`` (group ``image:<seq>``,
averaged over the sites that have that sequence); with ``"shared"`` one ``encoders.image`` encodes
every sequence (group ``image``, weighted by the sites' image counts over all sequences).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MODALITIES, ConfigError, ModelConfig, Schema, is_modality, modality_kind
from .encoders import (
    SLICE_PREFIXES,
    ClinicalEncoder,
    ClinicalRaw,
    OmicsEncoder,
    OmicsRaw,
    SharedImageEncoder,
    build_image_encoder,
    build_shared_image_encoder,
)
from .encoders.temporal import build_temporal_encoder
from .fusion import Fusion
from .heads import PerModalityHead, schema_tasks
from .registry import TIMM_PREFIX, get_fusion, get_head, list_image_backbones, unknown_note
from .transfer import freeze_image_backbone

#: Parameter groups of a one-image schema; :meth:`FusionModel.parameter_groups` lists the model's own.
PARAMETER_GROUPS = (*MODALITIES, "fusion", "head")
_WRAPPERS = ("_module.", "module.")  # Opacus GradSampleModule, DataParallel/DDP


def parameter_group(name: str) -> str:
    """The group of a parameter or state_dict key of a :class:`FusionModel` (see module docstring).

    Works on bare names and on names from an Opacus-wrapped (``_module.``) or DDP (``module.``) model.
    """
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoders" and is_modality(parts[1]):
        return parts[1]
    if len(parts) > 2 and parts[0] == "absent" and is_modality(parts[1]):
        return "fusion"
    if len(parts) > 4 and parts[0] == "heads" and parts[2] == "per_modality" and is_modality(parts[3]):
        return parts[3]
    if parts[0] == "fusion":
        return "fusion"
    if parts[0] == "heads":
        return "head"
    raise ValueError(f"'{name}' is not a FusionModel parameter name")


def _building_graph() -> bool:
    """True while torch.jit.trace / torch.export (ONNX export) records the model rather than runs it."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.7
    return bool(torch.jit.is_tracing() or exporting() or torch.compiler.is_compiling())


def drop_modalities(mask: torch.Tensor, p: float) -> torch.Tensor:
    """Hide each present modality of each row with probability ``p``, never the last present one.

    Rows where every present modality was drawn for dropping keep one of them, chosen uniformly.
    Uses the global torch RNG (``torch.manual_seed`` reproduces it).
    """
    if p <= 0 or mask.numel() == 0:
        return mask
    kept = mask & ~(torch.rand(mask.shape, device=mask.device) < p)
    emptied = mask.any(dim=1) & ~kept.any(dim=1)
    pick = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0).argmax(dim=1)
    return kept | (F.one_hot(pick, mask.shape[1]).bool() & emptied.unsqueeze(1))


class FusionModel(nn.Module):
    """Multimodal model: ``forward(batch) -> {"logits", "risk", "modality_weights"}`` (as applicable).

    ``batch`` follows the data loader's contract: ``image`` (B, C, H, W), ``clinical_num``,
    ``clinical_cat``, ``omics`` for the schema's modalities and ``mask`` bool (B, M), M =
    ``len(schema.modalities)``, with at least one modality present per row. Every encoder runs on
    every row (absent rows hold zeros) so every parameter takes part in every step, as Opacus needs;
    rows of absent modalities are then replaced by learned "absent" embeddings.
    """

    def __init__(self, schema: Schema, cfg: ModelConfig, encoders: dict[str, nn.Module],
                 fusion: Fusion, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.schema, self.config = schema, cfg
        self.modalities = schema.modalities
        self.encoders = nn.ModuleDict(encoders)
        missing = [m for m in self.modalities if m not in encoders and modality_kind(m) not in encoders]
        if missing:
            raise ValueError(f"no encoder for modalities {missing}; got encoders for {sorted(encoders)}")
        self.absent = nn.ModuleDict()
        if fusion.uses_absent:
            for m in self.modalities:
                self.absent[m] = nn.Embedding(1, self._encoder_of(m).out_dim)
                nn.init.zeros_(self.absent[m].weight)
        self.fusion = fusion
        self.heads = nn.ModuleDict(heads)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = self._mask(batch)
        if self.training:
            mask = drop_modalities(mask, self.config.modality_dropout)
        embeddings = []
        for i, m in enumerate(self.modalities):
            encoder = self._encoder_of(m)
            e = encoder.encode(batch, m) if isinstance(encoder, SharedImageEncoder) else encoder(batch)
            if m in self.absent:
                absent = self.absent[m](torch.zeros(e.shape[0], dtype=torch.long, device=e.device))
                e = torch.where(mask[:, i : i + 1], e, absent)
            embeddings.append(e)
        fused = self.fusion(embeddings, mask)
        out: dict[str, torch.Tensor] = {}
        for head in self.heads.values():
            if isinstance(head, PerModalityHead):
                out[head.output_key] = head(embeddings, fused.weights)
            else:
                out[head.output_key] = head(fused.features)
        if fused.weights is not None:
            out["modality_weights"] = fused.weights
        return out

    def _encoder_of(self, modality: str) -> nn.Module:
        """The modality's own encoder, or the shared one of its kind (``image-encoders = "shared"``)."""
        if modality in self.encoders:
            return self.encoders[modality]
        return self.encoders[modality_kind(modality)]

    def _mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("mask")
        if mask is None or mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            got = None if mask is None else tuple(mask.shape)
            raise ValueError(f"batch['mask'] has shape {got}; expected (B, {len(self.modalities)}) for "
                             f"modalities {list(self.modalities)}")
        mask = mask.bool()
        # A data-dependent check cannot be part of a traced/exported graph (torch.jit.trace would freeze
        # its outcome, torch.export refuses it): exported models document the rule instead.
        if not _building_graph() and not bool(mask.any(dim=1).all()):
            raise ValueError(
                "batch['mask'] has a row with no modality present; the data loader must drop such rows"
            )
        return mask

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names per group (each modality, e.g. image:t1, then fusion, head); groups may be empty.

        The federation averages each modality group only over sites that have that modality.
        """
        names = (*MODALITIES, *self.modalities, *self.encoders, "fusion", "head")
        groups: dict[str, list[str]] = {g: [] for g in dict.fromkeys(names)}
        for name, _ in self.named_parameters():
            groups.setdefault(parameter_group(name), []).append(name)
        return groups


def create_model(schema: Schema, cfg: ModelConfig | None = None) -> FusionModel:
    """Build the model for ``schema`` as ``cfg`` says; unknown names raise ``ConfigError``.

    The image backbone is random-init unless ``cfg.pretrained_path`` names a local file; it is then
    frozen in whole or in part as ``cfg.freeze_backbone``/``cfg.trainable_blocks`` say.
    """
    cfg = cfg or ModelConfig()
    try:
        fusion_cls = get_fusion(cfg.fusion)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    encoders: dict[str, nn.Module] = {}
    specs = schema.image_specs
    if specs:
        name = cfg.image_backbone
        if name not in list_image_backbones() and not name.startswith((TIMM_PREFIX, *SLICE_PREFIXES)):
            raise ConfigError(f"model: unknown image-backbone '{cfg.image_backbone}'; registered: "
                              f"{list_image_backbones()}, or '{TIMM_PREFIX}<any timm model name>', or "
                              f"slice pooling over a 2-D one: {[p + '<backbone>' for p in SLICE_PREFIXES]}"
                              f"{unknown_note()}")
        if schema.images and cfg.image_encoders == "shared":
            encoders["image"] = build_shared_image_encoder(name, specs, cfg.embed_dim, cfg.pretrained_path,
                                                           min_fraction=cfg.pretrained_min_fraction)
        else:
            for modality, spec in specs.items():
                encoders[modality] = build_image_encoder(name, spec, cfg.embed_dim, cfg.pretrained_path,
                                                         min_fraction=cfg.pretrained_min_fraction, key=modality)
        for encoder in encoders.values():
            freeze_image_backbone(encoder.backbone, freeze=cfg.freeze_backbone,
                                  trainable_blocks=cfg.trainable_blocks, name=cfg.image_backbone)
    elif cfg.pretrained_path or cfg.freeze_backbone or cfg.trainable_blocks:
        raise ConfigError(f"model: pretrained-path/freeze-backbone/trainable-blocks are set but schema "
                          f"'{schema.name}' has no image modality")
    if schema.clinical:
        encoders["clinical"] = ClinicalRaw(schema) if fusion_cls.raw_tabular else ClinicalEncoder(schema, cfg)
    if schema.omics:
        n = len(schema.omics)
        encoders["omics"] = OmicsRaw(n) if fusion_cls.raw_tabular else OmicsEncoder(n, cfg)
    if schema.visits:  # no raw form: even early fusion takes the visits through their temporal encoder
        encoders["visits"] = build_temporal_encoder(cfg.temporal_encoder, len(schema.visits.columns), cfg.embed_dim,
                                                    cfg.hidden_dim, cfg.dropout, cfg.temporal_layers,
                                                    cfg.temporal_heads)
    dims = {m: (encoders[m] if m in encoders else encoders[modality_kind(m)]).out_dim for m in schema.modalities}
    fusion = fusion_cls(dims, cfg)
    heads: dict[str, nn.Module] = {}
    for task in schema_tasks(schema):
        build = get_head(task)
        if fusion_cls.per_modality_heads:
            heads[task] = PerModalityHead(dims, lambda d, build=build: build(d, schema))
        else:
            heads[task] = build(fusion.out_dim, schema)
    return FusionModel(schema, cfg, encoders, fusion, heads)
