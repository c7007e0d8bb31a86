"""Per-modality encoders: each maps its part of the batch to (B, out_dim) (see DESIGN.md §4)."""

from .clinical import ClinicalEncoder, ClinicalRaw
from .image import (
    ImageEncoder,
    SharedImageEncoder,
    SmallCNN,
    build_image_encoder,
    build_shared_image_encoder,
    build_timm_backbone,
    load_local_weights,
)
from .omics import OmicsEncoder, OmicsRaw
from .slices import SLICE_PREFIXES, SlicePooling
from .surgery import check_opacus_ready, make_opacus_ready, num_groups
from .volume import SmallCNN3D

__all__ = [
    "ClinicalEncoder",
    "ClinicalRaw",
    "ImageEncoder",
    "OmicsEncoder",
    "OmicsRaw",
    "SLICE_PREFIXES",
    "SharedImageEncoder",
    "SlicePooling",
    "SmallCNN",
    "SmallCNN3D",
    "build_image_encoder",
    "build_shared_image_encoder",
    "build_timm_backbone",
    "check_opacus_ready",
    "load_local_weights",
    "make_opacus_ready",
    "num_groups",
]
