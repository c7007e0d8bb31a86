"""The fused clipping mode (``common/dp_fused.py``) is exact DP-SGD: its clipped per-sample sum equals
Opacus' hooks mode's (Opacus' own per-sample gradients, clip factors and optimizer) on the same batch,
for every layer rule, for the default model and for every encoder of the encoder matrix it accepts;
its ε equals hooks' ε; what it cannot handle it refuses (``fused``) or hands to hooks (``auto``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

import fedfusion.common.dp_fused as dp_fused
from fedfusion.common.config import ClinicalColumn, ImageSpec, ModelConfig, Schema
from fedfusion.common.dp_fused import FusedClippingModule, UnsupportedModel, unsupported_layers
from fedfusion.common.models import create_model
from fedfusion.common.privacy import make_private
from fedfusion.common.training import train_epochs
from tests.opacus_step import ce_plus_cox

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]

Batch = dict[str, torch.Tensor]
Loss = Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]
CLIP = 0.5


def _ce(out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out["logits"], batch["label"])


def _step_delta(model: nn.Module, batch: Batch, loss: Loss, mode: str) -> list[torch.Tensor]:
    """-(clipped per-sample sum) / batch, as one noiseless SGD step (lr 1) moves the weights.

    ``hooks``: Opacus' GradSampleModule + DPOptimizer (its per-sample gradients, norms and clip factors);
    ``fused``: FusedClippingModule + Opacus' DPOptimizerFastGradientClipping. Seeded forward: dropout and
    modality dropout draw the same masks in both.
    """
    n = len(batch["label"])
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    kwargs = dict(noise_multiplier=0.0, max_grad_norm=CLIP, expected_batch_size=n)
    torch.manual_seed(7)
    if mode == "hooks":
        module = GradSampleModule(model)
        optimizer = DPOptimizer(sgd, **kwargs)
        loss(module(batch), batch).backward()
    else:
        module = FusedClippingModule(model, CLIP)
        optimizer = DPOptimizerFastGradientClipping(sgd, **kwargs)
        module.loss(loss)(module(batch), batch).backward()
    optimizer.step()
    module._close()
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


def _assert_fused_equals_hooks(model: nn.Module, batch: Batch, loss: Loss) -> None:
    reference = copy.deepcopy(model)
    fused = _step_delta(model, batch, loss, "fused")
    hooks = _step_delta(reference, batch, loss, "hooks")
    names = [name for name, _ in model.named_parameters()]
    moved = 0
    for name, got, want in zip(names, fused, hooks, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"{name}: max diff {(got - want).abs().max():.2e}"
        moved += bool(want.abs().max() > 0)
    assert moved >= len(names) // 2  # the comparison is not between two zero updates


# ------------------------------------------------------------------------------------ layer rules


class _Layers(nn.Module):
    """Every rule: grouped/strided/dilated/'same' convs with bias, GroupNorm, a Linear on tokens (Gram and
    materialised), a Linear called twice, LayerNorm over tokens, an Embedding with repeated indices."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding="same", dilation=2, bias=False)
        self.tokens = nn.Linear(6, 40)  # 4 tokens: Gram form (16 x 46 < 6 x 40 is false -> materialised)
        self.wide = nn.Linear(40, 64)  # 4 tokens: 16 x 104 < 40 x 64 -> Gram form
        self.layer_norm = nn.LayerNorm(64)
        self.shared = nn.Linear(64, 8)
        self.embedding = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = F.relu(self.norm(self.conv1(batch["image"])))
        x = self.conv2(x)  # (B, 6, 4, 4)
        t = x.flatten(2).transpose(1, 2)[:, :4]  # (B, 4 tokens, 6)
        t = self.layer_norm(self.wide(torch.tanh(self.tokens(t))))
        pooled = self.shared(t.mean(1)) + self.shared(t[:, 0]) + self.embedding(batch["ids"]).sum(1)
        return {"logits": self.head(torch.tanh(pooled))}


def _layer_batch(n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 2, 8, 8, generator=g), "ids": torch.tensor([[0, 1, 1], [2, 2, 2], [3, 4, 0]] * 2),
            "label": torch.arange(n) % 2}


# Conv2d paths: per-sample gradients by grouped convolution or by unfold, kept or (keep limit 0) made one case
# at a time for the norms with the clipped sum as a weighted weight gradient
@pytest.mark.parametrize(("unfold_limit", "keep_limit"), [(0, 10**9), (10**9, 10**9), (0, 0)])
def test_every_layer_rule_gives_opacus_hooks_clipped_sum(monkeypatch: pytest.MonkeyPatch, unfold_limit: int,
                                                         keep_limit: int) -> None:
    monkeypatch.setattr(dp_fused, "_UNFOLD_LIMIT", unfold_limit)
    monkeypatch.setattr(dp_fused, "_KEEP_LIMIT", keep_limit)
    torch.manual_seed(0)
    _assert_fused_equals_hooks(_Layers(), _layer_batch(), _ce)


def test_embedding_padding_row_gets_no_gradient_as_in_autograd() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(4, 3, padding_idx=0)
    model = nn.ModuleDict({"embedding": embedding, "head": nn.Linear(3, 2)})
    module = FusedClippingModule(model, 1e6)  # no clipping: the fused sum must be autograd's gradient
    forward = lambda m: {"logits": m.head(m.embedding(batch["ids"]).sum(1))}  # noqa: E731
    batch = {"ids": torch.tensor([[0, 1, 1], [2, 0, 3]]), "label": torch.tensor([0, 1])}
    want = torch.autograd.grad(_ce(forward(model), batch), embedding.weight)[0]
    module._calls = {}
    module.loss(_ce)(forward(model), batch).backward()
    assert torch.equal(embedding.weight.grad[0], torch.zeros(3))
    assert torch.allclose(embedding.weight.grad, 2 * want, atol=1e-6)  # mean loss: the per-sample sum is B x it


# ---------------------------------------------------------------------------- the project's models


def _schema(task: str = "classification") -> Schema:
    clinical = (ClinicalColumn("age"), ClinicalColumn("grade", "categorical", ("1", "2", "3")))
    return Schema(name="fused", task=task, classes=("0", "1"), clinical=clinical,
                  omics=tuple(f"g{i}" for i in range(12)), image=ImageSpec(size=(32, 32), channels=1))


def _model_batch(schema: Schema, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(n, len(schema.modalities), dtype=torch.bool)
    mask[1, 0] = mask[2, 2] = mask[3, 1] = False  # missing modalities: absent embeddings take part
    return {"image": torch.randn(n, 1, 32, 32, generator=g), "clinical_num": torch.randn(n, 2, generator=g),
            "clinical_cat": torch.randint(0, 4, (n, 1), generator=g), "omics": torch.randn(n, 12, generator=g),
            "mask": mask, "label": torch.arange(n) % 2, "event": (torch.arange(n) % 3 != 0).float()}


@pytest.mark.parametrize(("task", "loss"), [("classification", _ce), ("both", ce_plus_cox)])
def test_default_model_fused_equals_hooks(task: str, loss: Loss) -> None:
    """ModelConfig() (attention fusion, cnn_small) with dropout and modality dropout on; the Cox term makes the
    loss non-separable, where fused follows hooks' semantics (gradients of the batch loss times B)."""
    schema = _schema(task)
    torch.manual_seed(0)
    _assert_fused_equals_hooks(create_model(schema, ModelConfig()).train(), _model_batch(schema), loss)


def _definition_step(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """DP-SGD's clipped sum by its definition: each case's own cross-entropy gradient from a forward of that
    case alone, clipped by Opacus' formula min(1, C / (||g_i|| + 1e-6)), summed, / batch (a noiseless step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(batch["label"])
    total = [torch.zeros_like(p) for p in params]
    for i in range(n):
        case = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(_ce(model(case), case), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        norm = torch.stack([g.norm() for g in grads]).norm()
        factor = (CLIP / (norm + 1e-6)).clamp(max=1.0)
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [-t / n for t in total]


def _matrix_cases() -> list[str]:
    from tests.unit.common.test_encoder_matrix import CASES

    return list(CASES)


@pytest.mark.parametrize("encoder", _matrix_cases())
def test_encoder_matrix_fused_equals_definition_or_auto_uses_hooks(encoder: str) -> None:
    """Every encoder of tests/unit/common/test_encoder_matrix.py with the default (attention) fusion: the
    fused clipped sum equals DP-SGD's definition (one case at a time; Opacus' hooks would take ~10 s on
    EfficientNet here), or the model is refused and ``auto`` picks hooks."""
    from tests.unit.common.test_encoder_matrix import CASES, _batch, _missing_mask

    case = CASES[encoder]
    torch.manual_seed(0)
    model = create_model(case.schema, case.config("attention")).train()
    if unsupported_layers(model):
        private = make_private(model, [{"x": torch.zeros(1)}] * 4, torch.optim.SGD(model.parameters(), lr=0.1), _ce,
                               batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="auto")
        private.close()
        assert private.grad_sample_mode == "hooks"
        assert encoder in ("2d-convnext_atto", "2d-vit_tiny_patch16_224", "3d-cnn3d_small")  # no silent shrinkage
        return
    mask = torch.cat([torch.ones(2, len(case.schema.modalities), dtype=torch.bool), _missing_mask(case.schema)])
    batch = _batch(case.schema, mask, seed=1)
    want = _definition_step(model, batch)
    got = _step_delta(model, batch, _ce, "fused")
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), f"{name}: max diff {(g - w).abs().max():.2e}"
    assert sum(bool(w.abs().max() > 0) for w in want) >= len(want) // 2


# ----------------------------------------------------------------------------- through make_private


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"logits": self.out(torch.tanh(self.hidden(batch["x"])))}


def _data(n: int) -> list[Batch]:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return [{"x": x[i], "mask": torch.ones(1, dtype=torch.bool), "label": torch.tensor(i % 2)} for i in range(n)]


def _train(mode: str, epochs: int = 2) -> tuple[object, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _Toy()
    private = make_private(model, _data(30), torch.optim.SGD(model.parameters(), lr=0.1), _ce, batch_size=10,
                           noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode=mode, secret_seed=4)
    train_epochs(private.module, private.loader, private.optimizer, private.loss_fn, epochs, torch.device("cpu"),
                 amp=False, on_empty_batch=private.empty_step)
    private.close()
    return private, [p.detach().clone() for p in model.parameters()]


def test_fused_epsilon_after_k_steps_equals_hooks_epsilon() -> None:
    fused, _ = _train("fused")
    hooks, _ = _train("hooks")
    assert fused.grad_sample_mode == "fused" and hooks.grad_sample_mode == "hooks"
    assert fused.steps_taken() == hooks.steps_taken() == 6
    assert fused.accountant.history == hooks.accountant.history == [(1.1, 1 / 3, 6)]
    assert fused.epsilon(1e-5) == hooks.epsilon(1e-5) > 0


def test_fused_update_is_noised_at_sigma_times_clip() -> None:
    """Same secret seed, same Poisson batches: the fused and hooks updates differ by float error only, so
    the noise is the same N(0, σ²C²) draw on the same clipped sum."""
    _, fused = _train("fused", epochs=1)
    _, hooks = _train("hooks", epochs=1)
    for got, want in zip(fused, hooks, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


class _Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)
        self.out = nn.Linear(2, 2)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"logits": self.out(self.conv(batch["x"].view(-1, 1, 1, 1, 4).expand(-1, 1, 3, 3, 4)).mean((2, 3, 4)))}


class _TiedWeight(_Toy):
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # the weight is read outside its layer
        hidden = torch.tanh(self.hidden(batch["x"]))
        return {"logits": self.out(hidden) + F.linear(hidden, self.out.weight)}


class _InPlace(_Toy):
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # the layer's output is changed in place
        return {"logits": self.out(F.relu(self.hidden(batch["x"]), inplace=True))}


@pytest.mark.parametrize(("model_cls", "message"), [
    (_Conv3d, "supports Linear, Conv2d, GroupNorm, LayerNorm and Embedding layers only; this model also has conv"),
    (_TiedWeight, "does not reproduce the gradient of 'out.weight'"),
    (_InPlace, "changed in place"),
])
def test_fused_refuses_what_it_cannot_clip_and_auto_falls_back_to_hooks(model_cls: type, message: str) -> None:
    def wrap(mode: str) -> object:
        model = model_cls()
        return make_private(model, _data(8), torch.optim.SGD(model.parameters(), lr=0.1), _ce, batch_size=4,
                            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)

    with pytest.raises(UnsupportedModel, match=message):
        wrap("fused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = wrap("auto")
    private.close()
    assert private.grad_sample_mode == "hooks"
