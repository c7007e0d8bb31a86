"""Temporal encoders (GRU, transformer): padding, gap-awareness, Opacus per-sample gradients, DP-SGD."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedfusion.common.config import ConfigError
from fedfusion.common.models.encoders.temporal import VisitGRU, VisitTransformer, build_temporal_encoder
from tests.opacus_step import one_private_step

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning"),
]

F_COLS, T = 3, 5
KINDS = ("gru", "transformer")


def _encoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_temporal_encoder(kind, F_COLS, embed_dim=8, hidden_dim=16, dropout=0.0, layers=2, heads=2)


def _batch(counts: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded visits: case i has counts[i] real visits at increasing times."""
    g = torch.Generator().manual_seed(seed)
    b = len(counts)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    gaps = (torch.rand(b, T, generator=g) + 0.1) * mask
    gaps[:, 0] = 0.0
    times = torch.cumsum(gaps, dim=1) * mask
    values = torch.randn(b, T, 2 * F_COLS, generator=g)
    values[..., 1::2] = (torch.rand(b, T, F_COLS, generator=g) < 0.2).float()  # missing flags
    values = values * mask.unsqueeze(2)
    return {"visits": values, "visits_time": times, "visits_gap": gaps, "visits_mask": mask}


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_with_padding_and_an_empty_case(kind):
    enc = _encoder(kind)
    batch = _batch([5, 2, 1, 0])
    out = enc(batch)
    assert out.shape == (4, enc.out_dim)
    assert torch.isfinite(out).all()  # the case without visits must not produce NaN (it poisons gradients)
    out.sum().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("kind", KINDS)
def test_padding_content_does_not_change_the_embedding(kind):
    enc = _encoder(kind).eval()
    batch = _batch([5, 2, 3])
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["visits_mask"]
    noisy["visits"][pad] = 99.0
    noisy["visits_time"][pad] = 42.0
    noisy["visits_gap"][pad] = 7.0
    assert torch.allclose(enc(batch), enc(noisy), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_changing_only_the_gaps_changes_the_output(kind):
    enc = _encoder(kind).eval()
    batch = _batch([4, 3])
    stretched = {k: v.clone() for k, v in batch.items()}
    stretched["visits_gap"] = batch["visits_gap"] * 3.0
    stretched["visits_time"] = torch.cumsum(stretched["visits_gap"], dim=1) * batch["visits_mask"]
    base, other = enc(batch), enc(stretched)
    assert (base - other).abs().max() > 1e-3
    gaps_only = {**batch, "visits_gap": batch["visits_gap"] * 3.0}  # times unchanged: the gap input itself counts
    assert (base - enc(gaps_only)).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_visit_order_matters(kind):
    """Reversing the values (same times) must change the embedding: the encoder is not a bag of visits."""
    enc = _encoder(kind).eval()
    batch = _batch([4])
    flipped = {**batch, "visits": torch.cat([batch["visits"][:, :4].flip(1), batch["visits"][:, 4:]], dim=1)}
    assert (enc(batch) - enc(flipped)).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_opacus_per_sample_gradients_equal_one_by_one_gradients(kind):
    """The GRU reuses its recurrent Linear at every step: Opacus must accumulate, not overwrite."""
    enc = _encoder(kind)
    batch = _batch([5, 3, 1, 0], seed=3)
    expected = []
    for i in range(4):
        enc.zero_grad()
        enc({k: v[i : i + 1] for k, v in batch.items()}).pow(2).sum().backward()
        expected.append({n: p.grad.clone() for n, p in enc.named_parameters()})
    gsm = GradSampleModule(enc, loss_reduction="sum")
    gsm.zero_grad()
    gsm(batch).pow(2).sum().backward()
    for n, p in enc.named_parameters():
        assert p.grad_sample is not None, n
        for i in range(4):
            assert torch.allclose(p.grad_sample[i], expected[i][n], atol=1e-5), (n, i)
    gsm._close()


@pytest.mark.parametrize("kind", KINDS)
def test_one_real_dp_sgd_step_moves_every_parameter(kind):
    enc = _encoder(kind)
    batch = _batch([5, 2, 1, 0, 4, 3, 2, 1], seed=1)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(8)]

    def loss(out: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return out.pow(2).mean()

    step = one_private_step(enc, samples, loss, lr=0.1, rows_key="visits_mask")
    assert step.missing == []
    assert step.unchanged == []
    assert step.steps == 1


def test_bad_shapes_and_names_are_clear_errors():
    enc = VisitGRU(F_COLS, 8, 16)
    batch = _batch([2])
    with pytest.raises(ValueError, match=r"batch\['visits'\] has shape \(1, 5, 4\); the schema expects \(B, T, 6\)"):
        enc({**batch, "visits": batch["visits"][..., :4]})
    with pytest.raises(ValueError, match=r"batch\['visits_gap'\] has shape None"):
        enc({k: v for k, v in batch.items() if k != "visits_gap"})
    with pytest.raises(ConfigError, match="unknown temporal-encoder 'lstm'"):
        build_temporal_encoder("lstm", 3, 8, 16, 0.0)
    with pytest.raises(ConfigError, match="divisible by temporal-heads 3"):
        VisitTransformer(3, 8, 16, heads=3)
