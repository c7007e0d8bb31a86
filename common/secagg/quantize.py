"""Fixed-point quantisation whose sums over n sites never wrap modulo 2^bits.

Masking works in the ring of integers modulo 2^bits, so floats are first mapped to integers
``q = round((x - low) / step)`` in ``[0, levels]``. The server only ever decodes a *sum*: with
``levels`` chosen so that ``num_sites * levels < 2^bits`` the masked sum modulo 2^bits equals the
true integer sum, and ``sum(x) = step * sum(q) + count * low`` (the offset ``count * low`` is
``-count * clip`` for updates). ``levels`` is even so that 0 in a symmetric range ``[-c, c]`` is
encoded exactly (a site that lacks a parameter group adds an exact zero).

Out-of-range values: DESIGN §6 says bounds are enforced by the client before masking. This codec
*clips* them to the range and reports how many it clipped (the site logs the count in its audit
log; a caller wanting to refuse instead can check ``clipped > 0``). Clipping rather than refusing
keeps one large coordinate from costing a hospital its round, and it is what DP pipelines
already do. NaN and infinity are refused: they mean a broken update, not a large one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfusion.common.secagg.masking import vector_dtype

MAX_VALUE_BITS = 40
"""Resolution cap: float64 maps levels up to 2^40 to integers within 2^-12 of a step, so the
round-trip error stays step/2 (more bits would buy rounding noise, not precision)."""


def required_bits(num_sites: int, value_bits: int) -> int:
    """Modulus bits needed so that the sum of ``num_sites`` values of ``value_bits`` resolution
    (integers 0..2^value_bits) never wraps."""
    if num_sites < 1 or value_bits < 1:
        raise ValueError("num_sites and value_bits must be positive")
    return (num_sites * 2**value_bits).bit_length()


@dataclass(frozen=True)
class QuantizeResult:
    """Quantised values plus how many inputs lay outside the range and were clipped (for the audit log)."""

    values: np.ndarray
    clipped: int


class FixedPointCodec:
    """Maps floats in ``[low, high]`` to integers in ``[0, levels]`` with a sum of ``num_sites`` of
    them below 2^bits. ``value_bits`` (integers 0..2^value_bits per site) defaults to the finest
    resolution that fits, capped at ``MAX_VALUE_BITS``."""

    def __init__(self, low: float, high: float, num_sites: int, bits: int = 32, value_bits: int | None = None):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"the quantisation range must be finite with low < high, got [{low}, {high}]")
        if num_sites < 1:
            raise ValueError(f"num_sites must be at least 1, got {num_sites}")
        self.dtype = vector_dtype(bits)
        self.low, self.high, self.num_sites, self.bits = float(low), float(high), num_sites, bits
        largest = ((2**bits - 1) // num_sites) & ~1  # even, and num_sites * levels <= 2^bits - 1
        if value_bits is None:
            levels = min(largest, 2**MAX_VALUE_BITS)
        else:
            if not 1 <= value_bits <= MAX_VALUE_BITS:
                raise ValueError(f"value_bits must be in 1..{MAX_VALUE_BITS}, got {value_bits}")
            levels = 2**value_bits
            if levels > largest:
                raise ValueError(
                    f"the sum of {num_sites} sites at {value_bits} bits per value needs a "
                    f"{required_bits(num_sites, value_bits)}-bit modulus, but the modulus has {bits} bits: "
                    "raise the modulus bits or lower value_bits"
                )
        if levels < 2:
            raise ValueError(f"a {bits}-bit modulus cannot hold the sum of {num_sites} sites: raise the modulus bits")
        self.levels = levels
        self.step = (self.high - self.low) / levels

    def quantize(self, values: np.ndarray) -> QuantizeResult:
        """Integers for ``values`` (any shape, flattened); out-of-range values are clipped and counted."""
        x = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError("cannot quantise NaN or infinite values: the update is broken, not merely large")
        clipped = int(np.count_nonzero(x < self.low) + np.count_nonzero(x > self.high))
        np.clip(x, self.low, self.high, out=x)
        return QuantizeResult(self.quantize_in_range(x), clipped)

    def quantize_in_range(self, work: np.ndarray) -> np.ndarray:
        """Integers for a 1-D float64 array already finite and inside ``[low, high]``; ``work`` is
        overwritten (it is the caller's scratch buffer, which saves copies of large models)."""
        work -= self.low
        work *= self.levels / (self.high - self.low)
        np.rint(work, out=work)
        np.clip(work, 0, self.levels, out=work)
        return work.astype(self.dtype)

    def dequantize_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """Float64 sum of ``count`` sites' values from the integer sum of their quantised values.

        Error: at most ``count * step / 2`` per element.
        """
        if not 1 <= count <= self.num_sites:
            raise ValueError(f"count must be in 1..{self.num_sites} (the codec was sized for that many sites)")
        return np.asarray(total, dtype=np.float64) * self.step + count * self.low

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Float64 values of one site's quantised vector (used by tests; the server never has one)."""
        return self.dequantize_sum(q, 1)
