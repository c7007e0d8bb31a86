"""The flat vector a site masks: per-group weights, then every parameter, weighted and quantised.

Modality-aware FedAvg averages each parameter group (one per modality encoder, plus the shared
fusion/head) over the sites that trained it, weighted by their example counts. Under secure
aggregation the server may learn neither a site's update nor its counts, so both are masked in one
vector: slot ``g`` holds the site's weight ``w_g`` for group ``g``, the parameter slots hold
``w_g * x``. The server unmasks ``sum_i w_ig`` and ``sum_i w_ig * x_i`` and divides. A site lacking
a group contributes weight 0 and exact zeros, so the group is averaged only over sites that have it.

Weights are scaled by a public ``weight_bound`` (the largest count a site may report) so that
``w * x`` stays inside the update range ``[-clip, clip]``; a count above the bound is refused
(clipping a weight would silently reweight the federation). The price of the scaling: the
absolute error of the average is about ``n * step / 2 * weight_bound / sum(w)``, so choose the
bound near the real cohort sizes, or a 64-bit modulus.

Both sides build the layout from the same global model; ``digest`` lets them check they did.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedfusion.common.secagg.quantize import FixedPointCodec, QuantizeResult


@dataclass(frozen=True)
class LayoutEntry:
    """One parameter's place in the flat vector."""

    name: str
    group: str
    shape: tuple[int, ...]
    offset: int
    size: int


class VectorLayout:
    """Group weight slots (sorted group names) followed by parameters (sorted names), flattened."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], groups: Mapping[str, str]):
        missing = sorted(set(shapes) - set(groups))
        if missing:
            raise ValueError(f"parameters without a group: {missing[:5]}")
        if not shapes:
            raise ValueError("a layout needs at least one parameter")
        self.groups: tuple[str, ...] = tuple(sorted({groups[name] for name in shapes}))
        entries: list[LayoutEntry] = []
        offset = len(self.groups)
        for name in sorted(shapes):
            shape = tuple(int(d) for d in shapes[name])
            size = math.prod(shape)
            entries.append(LayoutEntry(name, groups[name], shape, offset, size))
            offset += size
        self.entries: tuple[LayoutEntry, ...] = tuple(entries)
        self.length = offset

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], groups: Mapping[str, str]) -> VectorLayout:
        """Layout of a model's state (e.g. the global model both sides hold)."""
        return cls({name: np.shape(value) for name, value in arrays.items()}, groups)

    def group_slot(self, group: str) -> int:
        return self.groups.index(group)

    def to_json(self) -> str:
        """Canonical JSON (also what ``digest`` hashes)."""
        return json.dumps([[e.name, e.group, list(e.shape)] for e in self.entries], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> VectorLayout:
        rows = json.loads(text)
        return cls({name: shape for name, _, shape in rows}, {name: group for name, group, _ in rows})

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: sites refuse to mask for a layout other than the server's."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class WeightedEncoder:
    """Turns a site's update and per-group weights into one quantised vector, and the unmasked sum
    back into per-parameter weighted sums and per-group weight sums."""

    def __init__(
        self,
        layout: VectorLayout,
        *,
        clip: float,
        weight_bound: float,
        num_sites: int,
        bits: int,
        value_bits: int | None = None,
    ):
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {clip}")
        if not (math.isfinite(weight_bound) and weight_bound > 0):
            raise ValueError(f"weight_bound must be a positive finite number, got {weight_bound}")
        self.layout, self.clip, self.weight_bound = layout, float(clip), float(weight_bound)
        self.update_codec = FixedPointCodec(-clip, clip, num_sites, bits, value_bits)
        self.weight_codec = FixedPointCodec(0.0, 1.0, num_sites, bits, value_bits)

    def encode(self, update: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> QuantizeResult:
        """Quantised ``[w_g / bound for g] + [w_g / bound * clip(x)]``; ``clipped`` counts entries of
        ``update`` outside ``[-clip, clip]``. Groups absent from ``weights`` (or with weight 0) are
        encoded as zeros and their parameters may be absent from ``update``."""
        layout = self.layout
        unknown_groups = sorted(set(weights) - set(layout.groups))
        if unknown_groups:
            raise ValueError(f"weights for groups not in the layout: {unknown_groups}")
        unknown = sorted(set(update) - {e.name for e in layout.entries})
        if unknown:
            raise ValueError(f"update keys not in the layout (another model version?): {unknown[:5]}")
        scaled = np.zeros(layout.length, dtype=np.float64)
        for group in layout.groups:
            scaled[layout.group_slot(group)] = self._scaled_weight(group, weights.get(group, 0.0))
        clipped = 0
        for entry in layout.entries:
            scale = scaled[layout.group_slot(entry.group)]
            if scale == 0.0:
                continue
            if entry.name not in update:
                raise ValueError(f"'{entry.name}' is missing although group '{entry.group}' has a weight")
            values = np.asarray(update[entry.name])
            if values.shape != entry.shape:
                raise ValueError(f"'{entry.name}' has shape {values.shape}, the layout expects {entry.shape}")
            work = scaled[entry.offset : entry.offset + entry.size]
            work[...] = values.reshape(-1)
            if not np.isfinite(work).all():
                raise ValueError(f"'{entry.name}' holds NaN or infinite values")
            clipped += int(np.count_nonzero(work > self.clip) + np.count_nonzero(work < -self.clip))
            np.clip(work, -self.clip, self.clip, out=work)
            work *= scale
        groups_count = len(layout.groups)
        weight_q = self.weight_codec.quantize_in_range(scaled[:groups_count])
        update_q = self.update_codec.quantize_in_range(scaled[groups_count:])
        return QuantizeResult(np.concatenate([weight_q, update_q]), clipped)

    def decode_sum(self, total: np.ndarray, count: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``({name: sum_i w_i * x_i}, {group: sum_i w_i})`` in the caller's units, from the integer
        sum of ``count`` sites' quantised vectors."""
        layout = self.layout
        groups_count = len(layout.groups)
        weights = self.weight_codec.dequantize_sum(total[:groups_count], count) * self.weight_bound
        values = self.update_codec.dequantize_sum(total[groups_count:], count) * self.weight_bound
        sums = {
            e.name: values[e.offset - groups_count : e.offset - groups_count + e.size].reshape(e.shape)
            for e in layout.entries
        }
        return sums, {group: float(weights[i]) for i, group in enumerate(layout.groups)}

    def _scaled_weight(self, group: str, weight: float) -> float:
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the weight of group '{group}' must be a finite number >= 0, got {weight}")
        if weight > self.weight_bound:
            raise ValueError(
                f"the weight of group '{group}' ({weight:g}) exceeds weight_bound ({self.weight_bound:g}): "
                "the federation's weight_bound must be at least the largest example count of any site"
            )
        return weight / self.weight_bound
