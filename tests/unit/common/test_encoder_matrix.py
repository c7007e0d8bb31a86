"""Every image encoder kind x every fusion: forward/backward, one real Opacus DP-SGD step, missing branches.

Encoder kinds: each registered 2-D backbone on 32x32 images, each registered volumetric backbone
(``cnn3d_small``, slice pooling) on 4x16x16 volumes, and a two-sequence (T1 + FLAIR) schema with
separate and with shared encoders. A new backbone or fusion joins the matrix by being registered.

"Missing branch" is checked as behaviour, not as "it ran": in eval mode the outputs of a row whose
image (or one sequence) is absent must not change when that absent image's pixels change, while a
present image's pixels must change its row's output, and attention/gated/late weights of absent
branches must be exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fedfusion.common.config import ClinicalColumn, ImageSpec, ModelConfig, Schema
from fedfusion.common.models import create_model, list_fusions, list_image_backbones
from tests.opacus_step import ce_plus_cox, one_private_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning"),
]

CLINICAL = (ClinicalColumn("age"), ClinicalColumn("grade", "categorical", ("1", "2", "3")))
OMICS = tuple(f"g{i}" for i in range(6))


@dataclass(frozen=True)
class EncoderCase:
    """One image encoder kind: the schema it reads and the model settings that select it."""

    schema: Schema
    backbone: str
    image_encoders: str = "separate"
    extra: dict = field(default_factory=dict)

    def config(self, fusion: str) -> ModelConfig:
        return ModelConfig(fusion=fusion, image_backbone=self.backbone, image_encoders=self.image_encoders,
                           embed_dim=16, hidden_dim=32, dropout=0.0, modality_dropout=0.0)


def _schema(name: str, **images) -> Schema:
    return Schema(name=name, task="both", classes=("a", "b"), clinical=CLINICAL, omics=OMICS, **images)


def _cases() -> dict[str, EncoderCase]:
    cases = {f"2d-{b}": EncoderCase(_schema("img2d", image=ImageSpec(size=(32, 32))), b)
             for b in list_image_backbones(volumetric=False)}
    cases |= {f"3d-{b}": EncoderCase(_schema("img3d", image=ImageSpec(size=(16, 16), depth=4)), b)
              for b in list_image_backbones(volumetric=True)}
    sequences = tuple(ImageSpec(column=seq, size=(32, 32), name=seq) for seq in ("t1", "flair"))
    for mode in ("separate", "shared"):
        cases[f"multiseq-{mode}"] = EncoderCase(_schema("mri", images=sequences), "cnn_small", mode)
    return cases


CASES = _cases()
FUSIONS = list_fusions()


def _batch(schema: Schema, mask: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-style batch: absent modalities zero-filled, ``mask`` (B, M) in schema.modalities order."""
    g = torch.Generator().manual_seed(seed)
    b = mask.shape[0]
    batch: dict[str, torch.Tensor] = {"mask": mask.clone()}
    for i, m in enumerate(schema.modalities):
        keep = mask[:, i].float()
        if m in schema.image_specs:
            shape = schema.image_specs[m].shape
            batch[m] = torch.randn(b, *shape, generator=g) * keep.view(-1, *([1] * len(shape)))
        elif m == "clinical":
            batch["clinical_num"] = torch.randn(b, schema.clinical_width, generator=g) * keep.view(-1, 1)
            batch["clinical_cat"] = torch.randint(1, 4, (b, 1), generator=g) * mask[:, i : i + 1].long()
        else:
            batch["omics"] = torch.randn(b, len(schema.omics), generator=g) * keep.view(-1, 1)
    batch["label"] = torch.arange(b) % 2
    batch["event"] = (torch.arange(b) % 3 != 0).float()
    return batch


def _missing_mask(schema: Schema) -> torch.Tensor:
    """Row 0 all present; row 1 lacks the first image modality (one sequence when there are two);
    row 2 lacks every image; row 3 has only the last image modality and omics."""
    m = len(schema.modalities)
    images = [i for i, name in enumerate(schema.modalities) if name in schema.image_specs]
    mask = torch.ones(4, m, dtype=torch.bool)
    mask[1, images[0]] = False
    mask[2, images] = False
    mask[3] = False
    mask[3, images[-1]] = True
    mask[3, schema.modalities.index("omics")] = True
    return mask


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("encoder", list(CASES))
def test_forward_backward(encoder: str, fusion: str) -> None:
    case = CASES[encoder]
    torch.manual_seed(0)
    model = create_model(case.schema, case.config(fusion)).train()
    batch = _batch(case.schema, torch.ones(4, len(case.schema.modalities), dtype=torch.bool))
    out = model(batch)
    assert out["logits"].shape == (4, 2) and out["risk"].shape == (4,)
    ce_plus_cox(out, batch).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert no_grad == [] and not_finite == []
    image_params = [p for n, p in model.named_parameters() if n.startswith("encoders.image")]
    assert image_params and any(float(p.grad.abs().sum()) > 0 for p in image_params)  # images reach the loss


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("encoder", list(CASES))
def test_missing_branch(encoder: str, fusion: str) -> None:
    case = CASES[encoder]
    schema = case.schema
    torch.manual_seed(0)
    model = create_model(schema, case.config(fusion)).eval()
    mask = _missing_mask(schema)
    batch = _batch(schema, mask)
    with torch.no_grad():
        out = model(batch)
        changed = dict(batch)
        for m in schema.image_specs:  # new pixels for every image, present or absent
            changed[m] = torch.randn_like(batch[m]) * 3.0
        out2 = model(changed)
    for key in ("logits", "risk"):
        assert torch.isfinite(out[key]).all()
    # row 2 has no image at all: its outputs ignore the (absent) pixels exactly
    for key in ("logits", "risk"):
        assert torch.allclose(out[key][2], out2[key][2], atol=1e-6), key
    # rows with an image present do react to its pixels (the check above can fail)
    assert not torch.allclose(out["logits"][0], out2["logits"][0], atol=1e-6)
    if "modality_weights" in out:
        weights = out["modality_weights"]
        assert torch.equal(weights[~mask], torch.zeros_like(weights[~mask]))
        assert torch.allclose(weights.sum(dim=1), torch.ones(4), atol=1e-5)
    if len(schema.image_specs) > 1:
        # row 1 lacks only T1: changing T1 alone leaves it unchanged, changing FLAIR does not
        t1, flair = list(schema.image_specs)
        with torch.no_grad():
            only_t1 = model({**batch, t1: torch.randn_like(batch[t1])})
            only_flair = model({**batch, flair: torch.randn_like(batch[flair]) * 3.0})
        assert torch.allclose(out["logits"][1], only_t1["logits"][1], atol=1e-6)
        assert not torch.allclose(out["logits"][1], only_flair["logits"][1], atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("encoder", list(CASES))
def test_private_step(encoder: str, fusion: str) -> None:
    """One DP-SGD step through the site's own wrapping (common/privacy.py): per-sample gradients for
    every parameter, every parameter moved (noise reaches all of them)."""
    case = CASES[encoder]
    schema = case.schema
    torch.manual_seed(0)
    model = create_model(schema, case.config(fusion))
    mask = torch.cat([torch.ones(4, len(schema.modalities), dtype=torch.bool), _missing_mask(schema)])
    full = _batch(schema, mask, seed=1)
    samples = [{k: v[i] for k, v in full.items()} for i in range(len(mask))]
    step = one_private_step(model, samples, ce_plus_cox, min_rows=2)
    assert step.missing == [], f"no per-sample gradient for {step.missing[:5]}"
    assert step.wrong_rows == [], f"per-sample gradients not per case for {step.wrong_rows[:5]}"
    assert step.unchanged == []
