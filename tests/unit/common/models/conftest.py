"""Fixtures for the model tests: a small three-modality schema and batches of random data that
follow the data loader's batch contract (see common/models/model.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedfusion.common.config import ClinicalColumn, ImageSpec, Schema

Batch = dict[str, torch.Tensor]


@pytest.fixture
def schema() -> Schema:
    """2 numeric + 1 categorical clinical columns, 10 omics features, 32x32 grey image, task both."""
    return Schema(
        name="unit",
        task="both",
        classes=("benign", "malignant"),
        clinical=(
            ClinicalColumn("age"),
            ClinicalColumn("tumour_size"),
            ClinicalColumn("grade", "categorical", ("1", "2", "3")),
        ),
        omics=tuple(f"gene{i}" for i in range(10)),
        image=ImageSpec(size=(32, 32), channels=1),
    )


def random_batch(schema: Schema, batch_size: int = 4, present: tuple[bool, ...] | None = None,
                 seed: int = 0) -> Batch:
    """Random batch for ``schema``; absent modalities are zero-filled as the loader does."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    if present is None:
        mask = torch.rand(b, len(schema.modalities), generator=g) < 0.7
        mask[:, 0] |= ~mask.any(dim=1)
    else:
        mask = torch.tensor(present, dtype=torch.bool).expand(b, -1).clone()
    batch: Batch = {"mask": mask}
    for i, m in enumerate(schema.modalities):
        keep = mask[:, i].float()
        if m == "image":
            h, w = schema.image.size
            batch["image"] = torch.randn(b, schema.image.channels, h, w, generator=g) * keep.view(-1, 1, 1, 1)
        elif m == "clinical":
            num = torch.zeros(b, schema.clinical_width)
            num[:, 0::2] = torch.randn(b, len(schema.numeric_columns), generator=g)
            num[:, 1::2] = (torch.rand(b, len(schema.numeric_columns), generator=g) < 0.2).float()
            num[:, 0::2] *= 1 - num[:, 1::2]
            batch["clinical_num"] = num * keep.view(-1, 1)
            cats = [torch.randint(0, len(c.categories) + 1, (b,), generator=g)
                    for c in schema.categorical_columns]
            cat = torch.stack(cats, dim=1) if cats else torch.zeros(b, 0, dtype=torch.long)
            batch["clinical_cat"] = cat * mask[:, i].long().view(-1, 1)
        else:
            batch["omics"] = torch.randn(b, len(schema.omics), generator=g) * keep.view(-1, 1)
    return batch


@pytest.fixture
def make_batch() -> Callable[..., Batch]:
    """``make_batch(schema, batch_size=4, present=None, seed=0)``: see :func:`random_batch`."""
    return random_batch


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every model test runs with one intra-op thread (``one_torch_thread`` in tests/conftest.py)."""
    yield
