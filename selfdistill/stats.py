"""Statistics of the results tables: sample standard deviation, paired bootstrap intervals.

A table row is compared with its baseline on the *same* items evaluated with
the same seed's settings, so the per-item differences are paired: the
interval of the mean difference resamples seeds and, within each, items
(a two-level bootstrap), which is what separates a real 3-point gain from
item noise when 500 items give each accuracy a ~2-point standard error.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); 0 for fewer than two values."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class PairedDiff:
    """Mean of (row - baseline) over seeds and items, with a bootstrap interval (percentage points)."""

    diff: float
    lo: float
    hi: float
    n_seeds: int
    n_items: int

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.lo > 0 or self.hi < 0

    def format(self) -> str:
        return f"{self.diff:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]"


def paired_bootstrap(row_SI: Sequence[Sequence[float]], base_SI: Sequence[Sequence[float]],
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedDiff:
    """Paired difference of per-item scores ``row - base`` (seeds x items, same items in the same order).

    Each bootstrap replicate draws seeds with replacement, then items with
    replacement within each drawn seed, and averages the differences.
    Values are in [0, 1] per item; the result is in percentage points.
    """
    a, b = np.asarray(row_SI, dtype=float), np.asarray(base_SI, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal seeds x items arrays, got {a.shape} and {b.shape}")
    d = a - b
    S, I = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(n_boot, S))
    items = rng.integers(0, I, size=(n_boot, S, I))
    reps = d[seeds[:, :, None], items].mean(axis=(1, 2))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return PairedDiff(100 * float(d.mean()), 100 * float(lo), 100 * float(hi), S, I)
