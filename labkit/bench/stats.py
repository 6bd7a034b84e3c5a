"""Statistics for benchmark samples: median, quartiles, relative spread, a bootstrap interval
and ratios computed pair by pair (guest sample of round *i* over native sample of round *i*).

Pure functions over lists of floats; unit-tested on known samples.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["NOISE_LIMIT", "Summary", "bootstrap_median", "paired_ratios", "summarize"]

#: a measurement whose IQR is more than this fraction of its median is called noisy
NOISE_LIMIT = 0.10


@dataclass(frozen=True)
class Summary:
    """n, median, first and third quartile (inclusive method), IQR, min, max and IQR/median."""

    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    min: float
    max: float
    spread: float  # IQR / median (0 when the median is 0)

    @property
    def noisy(self) -> bool:
        return self.spread > NOISE_LIMIT

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "noisy": self.noisy}


def summarize(values: Sequence[float]) -> Summary | None:
    """Summary of ``values`` (None for an empty list). Quartiles use the inclusive method, so for
    [1, 2, 3, 4, 5] they are 2 and 4, and a single value is its own median and quartiles."""
    data = sorted(float(v) for v in values)
    if not data:
        return None
    if any(math.isnan(v) for v in data):
        raise ValueError("NaN in the samples")
    if len(data) == 1:
        q1 = med = q3 = data[0]
    else:
        q1, med, q3 = statistics.quantiles(data, n=4, method="inclusive")
    iqr = q3 - q1
    return Summary(len(data), med, q1, q3, iqr, data[0], data[-1], iqr / med if med else 0.0)


def paired_ratios(numerators: dict[int, float], denominators: dict[int, float]) -> list[float]:
    """guest/native per round: only rounds present in both (keyed by round number), native > 0."""
    return [numerators[r] / denominators[r] for r in sorted(numerators)
            if r in denominators and denominators[r] > 0]


def bootstrap_median(values: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap interval for the median (deterministic: seeded)."""
    data = list(values)
    if not data:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(data, k=len(data))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * (resamples - 1))]
    hi = meds[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi
