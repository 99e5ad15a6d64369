"""Statistics for paired comparisons on the same examples: bootstrap CIs, sign test, BH q-values."""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

BOOTSTRAP_RESAMPLES = 1000


def bootstrap_indices(groups: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """resamples x n example indices, resampled with replacement within each group (task), so every
    resample keeps each task's size. Drawn once and shared by all comparisons of a run."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    out = np.empty((resamples, len(groups)), dtype=np.int64)
    for g in dict.fromkeys(groups.tolist()):
        members = np.flatnonzero(groups == g)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def paired_ci(base: np.ndarray, other: np.ndarray, weights: np.ndarray, indices: np.ndarray,
              level: float = 0.95) -> list[float] | None:
    """Percentile CI of sum(weights * (other - base)) over paired bootstrap resamples of examples.
    None when any score is NaN (non-finite logits)."""
    diff = (np.asarray(other, float) - np.asarray(base, float)) * weights
    if np.isnan(diff).any():
        return None
    totals = diff[indices].sum(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(totals, [alpha, 1 - alpha])
    return [round(float(lo), 4), round(float(hi), 4)]


def sign_test(base: np.ndarray, other: np.ndarray) -> float | None:
    """Exact two-sided sign test on the examples whose correctness changed (McNemar's exact test)."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    if np.isnan(base).any() or np.isnan(other).any():
        return None
    lost = int(((base == 1) & (other == 0)).sum())
    gained = int(((base == 0) & (other == 1)).sum())
    if lost + gained == 0:
        return 1.0
    return float(scipy_stats.binomtest(lost, lost + gained, 0.5).pvalue)


def benjamini_hochberg(p_values: list[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (q-values); None stays None and is not counted."""
    known = [i for i, p in enumerate(p_values) if p is not None]
    q: list[float | None] = [None] * len(p_values)
    if not known:
        return q
    p = np.array([p_values[i] for i in known])
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    for rank, k in enumerate(order):
        q[known[k]] = float(adjusted[rank])
    return q


def spearman(x, y) -> float | None:
    """Spearman rank correlation, None when undefined (fewer than 3 pairs or a constant side)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(scipy_stats.spearmanr(x, y).statistic)
