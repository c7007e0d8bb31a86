"""Clinical and omics encoders (and their raw forms used by early fusion)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfusion.common.config import ModelConfig
from fedfusion.common.models.encoders import ClinicalEncoder, ClinicalRaw, OmicsEncoder, OmicsRaw


def test_clinical_encoder_embeds_each_categorical_column_with_a_missing_slot(schema, make_batch):
    encoder = ClinicalEncoder(schema, ModelConfig(embed_dim=12, categorical_embed_dim=4))
    batch = make_batch(schema, batch_size=6)

    out = encoder(batch)

    assert out.shape == (6, 12)
    assert [e.num_embeddings for e in encoder.embeddings] == [4]  # 3 categories + missing (index 0)
    assert encoder.embeddings[0].padding_idx is None  # missing is learned (see clinical.py)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())


def test_clinical_encoder_rejects_a_wrong_width(schema, make_batch):
    encoder = ClinicalEncoder(schema, ModelConfig())
    batch = make_batch(schema, batch_size=2)
    with pytest.raises(ValueError, match=r"clinical_num.*\(B, 4\)"):
        encoder(dict(batch, clinical_num=batch["clinical_num"][:, :3]))
    with pytest.raises(ValueError, match=r"clinical_cat.*\(B, 1\)"):
        encoder({k: v for k, v in batch.items() if k != "clinical_cat"})


def test_clinical_raw_is_values_plus_one_hot_categories(schema):
    raw = ClinicalRaw(schema)
    num = torch.tensor([[0.5, 0.0, 0.0, 1.0]])
    out = raw({"clinical_num": num, "clinical_cat": torch.tensor([[2]])})
    assert raw.out_dim == 4 + 4
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]))
    assert not list(raw.parameters())


def test_omics_encoder_is_self_normalising():
    torch.manual_seed(0)
    encoder = OmicsEncoder(200, ModelConfig(hidden_dim=256, embed_dim=32, dropout=0.1)).eval()
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert abs(linears[0].weight.std().item() - 200**-0.5) < 0.1 * 200**-0.5  # LeCun normal
    assert any(isinstance(m, nn.SELU) for m in encoder.modules())
    assert any(isinstance(m, nn.AlphaDropout) for m in encoder.modules())

    hidden = encoder.net[:5](torch.randn(4096, 200))  # after two SELU layers

    assert abs(hidden.mean().item()) < 0.15 and abs(hidden.std().item() - 1.0) < 0.15


def test_omics_raw_passes_the_vector_through_and_checks_width():
    raw = OmicsRaw(5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(raw({"omics": x}), x)
    with pytest.raises(ValueError, match=r"batch\['omics'\]"):
        raw({"omics": torch.randn(3, 4)})
