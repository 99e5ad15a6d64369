"""Statistics for configurations compared on the same examples: one paired comparison (Δ, bootstrap
CI, sign test) used by all three steps, the smallest Δ such a comparison can detect,
Benjamini-Hochberg q-values and Spearman correlation."""

from __future__ import annotations

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

BOOTSTRAP_RESAMPLES = 1000
SIGNIFICANCE = 0.05
POWER = 0.8


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


def compare(base: np.ndarray, other: np.ndarray, indices: np.ndarray, weights: np.ndarray | None = None,
            totals: np.ndarray | None = None, level: float = 0.95) -> dict:
    """`other` against `base`, scored on the same examples: Δ = metric(other) - metric(base) in points,
    its percentile CI over the paired bootstrap resamples `indices`, and the exact two-sided sign test
    over the examples whose score changed (McNemar's exact test for 0/1 scores).

    The metric is sum(weights * scores) (per-example weights: a mean over tasks of per-task means),
    or, with `totals`, 100 * sum(scores) / sum(totals) (a ratio such as instructions followed of
    instructions given). Every value is None when a score is NaN (non-finite logits)."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    if np.isnan(base).any() or np.isnan(other).any():
        return {"delta": None, "ci95": None, "p_value": None}
    if totals is None:
        diff = (other - base) * weights
        delta, resampled = diff.sum(), diff[indices].sum(axis=1)
    else:
        delta = 100.0 * (other.sum() - base.sum()) / totals.sum()
        resampled = 100.0 * (other[indices].sum(1) - base[indices].sum(1)) / totals[indices].sum(1)
    return {"delta": rounded(delta), "ci95": percentile_interval(resampled, level), "p_value": sign_test(base, other)}


def percentile_interval(resampled: np.ndarray, level: float = 0.95, digits: int = 4) -> list[float]:
    """The percentile bootstrap CI of a statistic from its values over the resamples, rounded."""
    alpha = (1 - level) / 2
    return [rounded(v, digits) for v in np.quantile(resampled, [alpha, 1 - alpha])]


def rounded(value: float, digits: int = 4) -> float:
    """`digits` decimals, and never -0.0 (which would print as "-0.00")."""
    return round(float(value), digits) + 0.0


def sign_test(base: np.ndarray, other: np.ndarray) -> float | None:
    """Exact two-sided sign test on the examples whose score changed (McNemar's exact test)."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    if np.isnan(base).any() or np.isnan(other).any():
        return None
    lost, gained = int((other < base).sum()), int((other > base).sum())
    if lost + gained == 0:
        return 1.0
    return float(scipy_stats.binomtest(lost, lost + gained, 0.5).pvalue)


def discordance(base: np.ndarray, others: list[np.ndarray]) -> float | None:
    """The share of examples whose score differs from the baseline, over all the comparisons
    `others` (rows scored on the same examples as `base`); rows with a NaN score are left out."""
    base = np.asarray(base, float)
    rows = [np.asarray(o, float) for o in others if not np.isnan(o).any()]
    if not rows or np.isnan(base).any():
        return None
    return float(np.mean([np.mean(row != base) for row in rows]))


def minimum_detectable_effect(discordance: float, weights: np.ndarray, alpha: float = SIGNIFICANCE,
                              power: float = POWER) -> float | None:
    """The smallest gain Δ (points) that a paired comparison of 0/1 scores detects with probability
    `power` in a two-sided test at level `alpha`, when a share `discordance` of the examples change.

    Δ = sum(weights * (other - base)) over examples with weights summing to 100 (points); each example
    changes with probability p, a gain more often than a loss. Connor's (1987) normal approximation
    to McNemar's test, solved for Δ:
        Δ = z(1 - alpha/2) * sqrt(S * p) + z(power) * sqrt(S * (p - d²)),
    d = Δ / 100 the per-example mean change, S = sum((weights / 100)²) (1/n for a plain mean), and
    p = max(discordance, d): a gain of d changes at least that share of the examples, so when few
    examples changed the figure is that of an effect whose every change goes one way. None for no
    examples."""
    weights = np.asarray(weights, float) / 100
    if discordance is None or len(weights) == 0:
        return None
    s, observed = float((weights**2).sum()), min(max(float(discordance), 0.0), 1.0)
    z_alpha, z_power = scipy_stats.norm.ppf(1 - alpha / 2), scipy_stats.norm.ppf(power)

    def gap(d: float) -> float:
        p = max(observed, d)
        return d - z_alpha * np.sqrt(s * p) - z_power * np.sqrt(max(s * (p - d * d), 0.0))

    grid = np.linspace(0.0, 1.0, 2001)
    detected = [i for i, d in enumerate(grid) if i and gap(d) > 0]
    if not detected:  # not even an effect on every example is detected this often
        return None
    return round(100 * float(optimize.brentq(gap, grid[detected[0] - 1], grid[detected[0]])), 4)


def detection_limit(base: np.ndarray, others: list[np.ndarray], weights: np.ndarray, what: str) -> dict:
    """A run's minimum detectable effect (points) and what it rests on: the comparisons `others`
    against `base` (`what` says which), their examples and weights, the observed discordance."""
    rate = discordance(base, others)
    return {"points": None if rate is None else minimum_detectable_effect(rate, weights),
            "comparisons": what, "examples": len(weights), "discordance": None if rate is None else round(rate, 4),
            "alpha": SIGNIFICANCE, "power": POWER}


def describe_detection_limit(limit: dict) -> str:
    """The minimum detectable effect in one line, for the console."""
    if limit["points"] is None:
        return f"Minimum detectable effect: none, {limit['examples']} examples are too few"
    return (f"Minimum detectable effect {limit['points']:.2f} points ({limit['comparisons']}: paired, "
            f"{limit['examples']} examples, {100 * limit['discordance']:.1f}% of them changed; two-sided "
            f"α = {limit['alpha']:g}, {100 * limit['power']:.0f}% power; 4× the examples halve it)")


def below_detection(delta: float | None, limit: dict) -> bool:
    """Whether a reported Δ is smaller in size than the run's minimum detectable effect."""
    return delta is not None and limit["points"] is not None and abs(delta) < limit["points"]


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


def proportion_ci(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) CI of a proportion seen as `hits` of `n` draws."""
    ci = scipy_stats.binomtest(hits, n).proportion_ci(level, method="exact")
    return float(ci.low), float(ci.high)


def is_significant(q_value: float | None) -> bool:
    """q < 0.05, q = 0 (a p-value that underflowed) included."""
    return q_value is not None and q_value < SIGNIFICANCE


def spearman(x, y) -> float | None:
    """Spearman rank correlation, None when undefined (fewer than 3 pairs or a constant side)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(scipy_stats.spearmanr(x, y).statistic)
