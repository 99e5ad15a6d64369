import numpy as np
import pytest
from scipy import stats as scipy_stats

from delta_steering.analysis.stats import (benjamini_hochberg, bootstrap_indices, compare, discordance,
                                           minimum_detectable_effect, sign_test, spearman)


def test_bootstrap_keeps_tasks_and_is_seeded():
    groups = np.array(["a"] * 5 + ["b"] * 3)
    idx = bootstrap_indices(groups, resamples=50, seed=3)
    assert idx.shape == (50, 8)
    assert np.isin(idx[:, :5], np.arange(5)).all() and np.isin(idx[:, 5:], [5, 6, 7]).all()
    assert np.array_equal(idx, bootstrap_indices(groups, resamples=50, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(groups, resamples=50, seed=4))


def test_paired_ci_brackets_the_observed_difference_and_matches_manual_loop():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 200).astype(float)
    other = np.where(rng.random(200) < 0.2, 1 - base, base)
    weights = np.full(200, 100 / 200)
    idx = bootstrap_indices(np.zeros(200), resamples=400, seed=1)
    result = compare(base, other, idx, weights)
    lo, hi = result["ci95"]
    manual = [((other - base) * weights)[row].sum() for row in idx]
    assert lo == pytest.approx(np.quantile(manual, 0.025), abs=1e-4)
    assert hi == pytest.approx(np.quantile(manual, 0.975), abs=1e-4)
    assert lo <= 100 * (other - base).mean() <= hi
    assert result["delta"] == pytest.approx(100 * (other - base).mean(), abs=1e-4)
    assert result["p_value"] == sign_test(base, other)
    assert compare(base, base, idx, weights) == {"delta": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0}
    assert compare(base, np.full(200, np.nan), idx, weights) == {"delta": None, "ci95": None, "p_value": None}


def test_compare_as_a_ratio_of_totals_matches_a_manual_loop():
    rng = np.random.default_rng(2)
    totals = rng.integers(1, 4, 50).astype(float)  # instructions per prompt
    base = np.minimum(rng.integers(0, 4, 50), totals)
    other = np.minimum(base + rng.integers(0, 2, 50), totals)
    idx = bootstrap_indices(np.zeros(50), resamples=300, seed=5)
    result = compare(base, other, idx, totals=totals)
    manual = [100 * (other[row].sum() - base[row].sum()) / totals[row].sum() for row in idx]
    assert result["ci95"] == pytest.approx(list(np.quantile(manual, [0.025, 0.975])), abs=1e-4)
    assert result["delta"] == pytest.approx(100 * (other.sum() - base.sum()) / totals.sum(), abs=1e-4)
    gained, lost = int((other > base).sum()), int((other < base).sum())
    assert result["p_value"] == pytest.approx(scipy_stats.binomtest(lost, lost + gained, 0.5).pvalue)


def test_sign_test_is_exact_binomial_on_changed_examples():
    base = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0])
    other = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 0])  # 5 lost, 1 gained
    assert sign_test(base, other) == pytest.approx(scipy_stats.binomtest(5, 6, 0.5).pvalue)
    assert sign_test(base, other) == pytest.approx(14 / 64)
    assert sign_test(base, base) == 1.0


def test_benjamini_hochberg_against_hand_computation():
    p = [0.01, 0.04, 0.03, 0.20, None]
    q = benjamini_hochberg(p)
    # sorted p .01 .03 .04 .20 times m/rank: .04 .06 .0533 .20; step-up minimum: .04 .0533 .0533 .20
    assert q[0] == pytest.approx(0.04)
    assert q[1] == pytest.approx(0.16 / 3) and q[2] == pytest.approx(0.16 / 3)
    assert q[3] == pytest.approx(0.2) and q[4] is None


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def simulated_detection_rate(n: int, discordance: float, effect: float, runs: int, rng) -> float:
    """How often the sign test (p < 0.05, in the right direction) detects a planted gain of `effect`
    points on n examples of which a share `discordance` change: a gain with probability (p + d) / 2,
    a loss with probability (p - d) / 2, d = effect / 100."""
    d = effect / 100
    detected = 0
    for _ in range(runs):
        u = rng.random(n)
        gain_share = (discordance + d) / 2
        gained, lost = int((u < gain_share).sum()), int(((u >= gain_share) & (u < discordance)).sum())
        base = np.r_[np.zeros(gained), np.ones(lost), np.zeros(n - gained - lost)]
        other = np.r_[np.ones(gained), np.zeros(lost), np.zeros(n - gained - lost)]
        detected += sign_test(base, other) < 0.05 and gained > lost
    return detected / runs


@pytest.mark.parametrize("n,discordance", [(400, 0.1), (100, 0.3), (200, 0.005)])
def test_minimum_detectable_effect_is_detected_80_percent_of_the_time(n, discordance):
    mde = minimum_detectable_effect(discordance, np.full(n, 100 / n))
    changed = max(discordance, mde / 100)  # few changes observed: the effect changes at least its own share
    rng = np.random.default_rng(0)
    assert 0.72 <= simulated_detection_rate(n, changed, mde, 1500, rng) <= 0.88
    assert simulated_detection_rate(n, max(discordance, mde / 200), mde / 2, 1500, rng) < 0.4


def test_minimum_detectable_effect_shrinks_as_one_over_root_n_and_needs_changes():
    small, large = (minimum_detectable_effect(0.2, np.full(n, 100 / n)) for n in (100, 1600))
    assert large < small / 3.5  # about a quarter, slightly less (the variance shrinks with the effect)
    # nothing changed: the effect whose every change is a gain, about (z(0.975) + z(0.8))² / n
    assert minimum_detectable_effect(0.0, np.full(400, 0.25)) == pytest.approx(100 * 7.85 / 400, rel=0.1)
    assert minimum_detectable_effect(0.0, np.full(400, 0.25)) == minimum_detectable_effect(0.001, np.full(400, 0.25))
    assert minimum_detectable_effect(0.5, np.full(3, 100 / 3)) is None  # 3 examples: nothing is detected 80% of times
    # two tasks of unequal size, weighted to a mean of task means: the same as n = 1 / sum(w²)
    weights = np.r_[np.full(50, 50 / 50), np.full(200, 50 / 200)]
    n_effective = 1 / ((weights / 100) ** 2).sum()
    assert minimum_detectable_effect(0.2, weights) == pytest.approx(
        minimum_detectable_effect(0.2, np.full(round(n_effective), 100 / round(n_effective))), rel=0.01)


def test_discordance_is_the_share_of_changed_examples_over_comparisons():
    base = np.array([1, 0, 1, 0.0])
    assert discordance(base, [np.array([1, 1, 1, 0.0]), np.array([0, 1, 0, 1.0]), np.full(4, np.nan)]) == 0.625
    assert discordance(base, []) is None
