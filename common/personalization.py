"""Personalisation settings both sides agree on: which parameter groups stay at the sites, and local fine-tuning.

Two composable pieces, chosen in the run config (``docs/experiments.md``, "Personalisation"):

- ``private-parts`` (FedPer/FedRep-style): comma-separated parameter groups (``head``, ``fusion``, or a
  modality such as ``omics``; see :func:`fedfusion.common.models.model.parameter_group`) that each site
  keeps. They are left out of every train reply (not zeroed: absent), kept at the site between rounds,
  and the server averages only the other, shared keys. Which keys are private is decided from the
  state_dict *names* alone (:func:`private_keys`), so the server, the site and the secure-aggregation
  layout compute the same set without building anything else.
- ``personal-finetune-epochs`` (FedAvg+FT): > 0 makes each site, at the evaluation of the run's last
  round, fine-tune a copy of the model it evaluates for up to that many epochs on its train split,
  pick the epoch count 0..N on its validation split, and report that model's test metrics under
  ``personal_*`` names. Only the last round: fine-tuning every round would cost N extra epochs per
  round at every site for numbers nobody reads.
- ``ditto-lambda`` (Ditto, Li et al. 2021): > 0 makes each site keep a whole personal model v_k of its own,
  trained every round for ``local-epochs`` epochs on its train split with the proximal term
  λ/2·||v_k − w||² toward the global model w the round delivered. The global update the site sends is
  computed exactly as without Ditto (v_k plays no part in it); v_k is kept at the site like private parts
  and its test metrics are reported every round as ``personal_*``. It is an alternative to the other two
  (both would also fill ``personal_*``), so combining them is refused.

"Norm" (FedBN-style private normalisation layers) is not offered: the model's normalisation layers are
GroupNorm/LayerNorm *inside* the encoders, with no running statistics; they are no group of their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fedfusion.common.config import ConfigError, is_modality

PRIVATE_PARTS_KEY = "private-parts"
FINETUNE_EPOCHS_KEY = "personal-finetune-epochs"
DITTO_LAMBDA_KEY = "ditto-lambda"
#: Evaluate-reply metrics of the fine-tuned model carry this prefix (``personal_c_index``, ...).
PERSONAL_PREFIX = "personal_"
#: Evaluate-reply metric: the fine-tuning epochs the site's validation split chose (0..N).
PERSONAL_EPOCHS_KEY = f"{PERSONAL_PREFIX}epochs"
#: Groups that may be private besides the modalities (``image``, ``clinical``, ``omics``, ``image:<seq>``).
NON_MODALITY_PARTS = ("head", "fusion")

T = TypeVar("T")


@dataclass(frozen=True)
class Personalization:
    """Parsed ``private-parts``, ``personal-finetune-epochs`` and ``ditto-lambda``; the defaults change nothing."""

    private_parts: tuple[str, ...] = ()
    finetune_epochs: int = 0
    ditto_lambda: float = 0.0

    @property
    def reports_personal(self) -> bool:
        """True when the sites report a personal model's metrics as ``personal_*`` (FedAvg+FT or Ditto)."""
        return self.finetune_epochs > 0 or self.ditto_lambda > 0

    @classmethod
    def from_run_config(cls, flat: Mapping[str, Any]) -> Personalization:
        raw = str(flat.get(PRIVATE_PARTS_KEY, "") or "")
        parts = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))
        unknown = [p for p in parts if p not in NON_MODALITY_PARTS and not is_modality(p)]
        if unknown:
            raise ConfigError(f"run config: {PRIVATE_PARTS_KEY} lists {unknown}; expected a comma-separated list of "
                              f"{list(NON_MODALITY_PARTS)} or modality names (image, clinical, omics, image:<seq>)")
        epochs = int(flat.get(FINETUNE_EPOCHS_KEY, 0) or 0)
        if epochs < 0:
            raise ConfigError(f"run config: {FINETUNE_EPOCHS_KEY} must be >= 0, got {epochs}")
        ditto = float(flat.get(DITTO_LAMBDA_KEY, 0.0) or 0.0)
        if not ditto >= 0 or ditto == float("inf"):
            raise ConfigError(f"run config: {DITTO_LAMBDA_KEY} must be a finite number >= 0, got {ditto}")
        if ditto > 0 and (parts or epochs):
            other = PRIVATE_PARTS_KEY if parts else FINETUNE_EPOCHS_KEY
            raise ConfigError(f"run config: {DITTO_LAMBDA_KEY} > 0 (Ditto) does not combine with {other}: each is a "
                              "personalisation method of its own; set one of them")
        return cls(private_parts=parts, finetune_epochs=epochs, ditto_lambda=ditto)


def private_keys(names: Iterable[str], parts: Iterable[str]) -> frozenset[str]:
    """The state_dict keys (parameters and buffers) of the groups in ``parts``.

    Names that are no :class:`~fedfusion.common.models.model.FusionModel` key (e.g. the secure-aggregation
    layout's clipped-fraction slot) are never private.
    """
    wanted = set(parts)
    if not wanted:
        return frozenset()
    from fedfusion.common.models.model import parameter_group  # here: parsing a run config needs no torch

    out = set()
    for name in names:
        try:
            group = parameter_group(name)
        except ValueError:
            continue
        if group in wanted:
            out.add(name)
    return frozenset(out)


def shared_part(arrays: Mapping[str, T], parts: Iterable[str]) -> dict[str, T]:
    """``arrays`` without the private groups' keys: what a site sends, and what the server averages."""
    private = private_keys(arrays, parts)
    return {k: v for k, v in arrays.items() if k not in private}


def private_part(arrays: Mapping[str, T], parts: Iterable[str]) -> dict[str, T]:
    """Only the private groups' keys of ``arrays``: what a site keeps."""
    private = private_keys(arrays, parts)
    return {k: v for k, v in arrays.items() if k in private}


#: ``fedfusion simulate --personalize NAME`` and the experiment's built-in personalised methods: run-config
#: overrides. The last round is delivered (``model-selection = "last"``): fine-tuning runs at the last round,
#: and a site's private head (or Ditto model) is the one of its last round, so "best validation round" would
#: score a model whose personal part no site holds any more.
PERSONALIZE_PRESETS: dict[str, dict[str, Any]] = {
    "ft": {FINETUNE_EPOCHS_KEY: 5, "model-selection": "last"},
    "fedper": {PRIVATE_PARTS_KEY: "head", "model-selection": "last"},
    # λ = 0.1: in the middle of the paper's grid {0.01, 0.1, 1, 2}; a study can try others as [method.NAME]
    "ditto": {DITTO_LAMBDA_KEY: 0.1, "model-selection": "last"},
}


def personal_view(metrics: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """A site's evaluate row as a FedAvg+FT or Ditto result: ``metric`` is the personal model's (NaN when the
    site reported none), the global model's moves to ``global_<metric>``."""
    out = dict(metrics)
    out[f"global_{metric}"] = metrics.get(metric, float("nan"))
    out[metric] = metrics.get(f"{PERSONAL_PREFIX}{metric}", float("nan"))
    return out
