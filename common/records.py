"""Model weights and metrics <-> Flower records: the only module in ``common`` that imports Flower.

Keys in reply MetricRecords are constants here so the client that writes them and the server
strategy that reads them cannot drift apart (Flower's own ``weighted_by_key="num-examples"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedfusion.common.config import MODALITIES, is_modality, modality_kind

NUM_EXAMPLES = "num-examples"
#: Evaluate replies: a site's validation-split size (summed, not averaged) and its ``val_``-prefixed
#: metrics, by which the server picks the delivered round (server/model_selection.py).
VAL_COUNT_KEY = "num-examples-val"
VAL_PREFIX = "val_"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
SITE_KEY = "site"
#: Train-reply metric: ε the site has spent on the run's study so far (sample-level DP).
EPSILON_KEY = "epsilon"
#: Train-reply metrics (sample-level DP; σ is not private): the noise multiplier σ the site trained with, and
#: the σ this run's plan needs from an unspent budget. Far apart, the site's budget is nearly spent.
NOISE_KEY = "noise-multiplier"
NOISE_ASKED_KEY = "noise-multiplier-asked"
#: Key in a reply's site ConfigRecord: why the site refused to train this round (privacy policy/budget).
REFUSED_KEY = "refused"


def refusal_reason(message: Message) -> str | None:
    """Why a site refused the round (a reply with a ``refused`` entry and no update), or None."""
    if message.has_error() or not message.has_content():
        return None
    site = message.content.config_records.get(SITE_KEY)
    return None if site is None or REFUSED_KEY not in site else str(site[REFUSED_KEY])


def modality_count_key(modality: str) -> str:
    """Reply key holding how many training cases of a site had ``modality`` present."""
    return f"{NUM_EXAMPLES}-{modality}"


#: Count keys of the fixed modalities; image sequences add ``num-examples-image:<seq>`` (dynamic names:
#: test with :func:`is_modality_count_key`, read with :func:`modality_count`).
MODALITY_COUNT_KEYS = {m: modality_count_key(m) for m in MODALITIES}
_COUNT_PREFIX = modality_count_key("")


def is_modality_count_key(key: str) -> bool:
    """Is ``key`` a per-modality count (``num-examples-clinical``, ``num-examples-image:t1``)?"""
    return key.startswith(_COUNT_PREFIX) and is_modality(key[len(_COUNT_PREFIX):])


def modality_count(counts: Mapping[str, float], group: str) -> float:
    """How many training cases of a site had ``group``'s modality: the weight of that group in FedAvg.

    A kind with no count of its own but with counts of its members is the shared encoder of a
    multi-sequence schema (group ``image``, sites report ``image:t1``, ``image:flair``, ...): it is
    weighted by the sum, the number of sequence images it was trained on at that site.
    """
    key = modality_count_key(group)
    if key in counts:
        return float(counts[key])
    members = [float(v) for k, v in counts.items()
               if is_modality_count_key(k) and k != key and modality_kind(k[len(_COUNT_PREFIX):]) == group]
    return float(sum(members))


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def arrays_to_model(arrays: ArrayRecord, model: torch.nn.Module) -> torch.nn.Module:
    """Load weights strictly: a key or shape mismatch means the site runs another model version."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in arrays.items()}


def numpy_to_arrays(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """One Array per tensor, bytes as ``Array(ndarray)`` writes them, in one copy (common/packing.py)."""
    from fedfusion.common.packing import encode_vector

    return ArrayRecord({key: encode_vector(np.asarray(value)) for key, value in values.items()})


def metrics_record(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of finite numbers only: NaN metrics (e.g. AUC on one class) are dropped, since
    Flower averages every key and one NaN would poison the federation-wide mean."""
    clean: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | np.integer):
            clean[key] = int(value)
        elif np.isfinite(value):
            clean[key] = float(value)
    return MetricRecord(clean)
