"""Step 2: amplify each group of step-1 neurons as a whole by each factor on held-out examples,
pick each group's optimal factor, and check whether single-neuron impacts replicate."""

from __future__ import annotations

import math

import numpy as np
from .scoring import example_weights, summarize
from .stats import bootstrap_indices, paired_ci, sign_test, spearman

DEFAULT_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.5, 2, 3, 5, 7, 9, 10, 20, 50, 100)
GROUP_TITLES = {"high_impact": "High Impact", "neutral": "Neutral"}


def strength(factor: float) -> str:
    """The seed's words for a factor's size."""
    if factor < 1:
        return "Suppress"
    if factor <= 3:
        return "Moderate"
    if factor <= 8:
        return "Strong"
    return "Very strong"


def mark(ci: list[float] | None) -> str:
    """✓ significant gain, ✗ significant loss (95% CI excludes 0), ~ no significant change."""
    if ci is None:
        return "?"
    return "✓" if ci[0] > 0 else "✗" if ci[1] < 0 else "~"


class Comparison:
    """Paired comparisons of configurations with the baseline on the same examples."""

    def __init__(self, examples, baseline: np.ndarray, seed: int):
        self.examples, self.baseline = examples, baseline
        self.weights = example_weights(examples)
        self.indices = bootstrap_indices(np.array([e.task for e in examples]), seed=seed)
        self.base = summarize(examples, baseline)

    def entry(self, correct: np.ndarray, **fields) -> dict:
        summary = summarize(self.examples, correct)
        accuracy = summary["accuracy"]
        ci = paired_ci(self.baseline, correct, self.weights, self.indices)
        entry = {**fields, "accuracy": accuracy,
                 "delta": None if accuracy is None else round(accuracy - self.base["accuracy"], 4),
                 "per_task": summary["per_task"], "ci95": ci, "p_value": sign_test(self.baseline, correct)}
        if summary["non_finite"]:
            entry["non_finite"] = summary["non_finite"]
        return entry


def factor_entries(comparison: Comparison, factors: list[float], rows: list[np.ndarray]) -> list[dict]:
    """One entry per factor from the held-out correctness with the group steered by that factor."""
    results = []
    for factor, correct in zip(factors, rows):
        entry = comparison.entry(correct, factor=float(factor))
        entry["label"] = f"{mark(entry['ci95'])} {strength(factor)}"
        results.append(entry)
    return results


def optimal_factor(results: list[dict]) -> dict | None:
    """Highest held-out accuracy; ties go to the factor closest to 1 in log scale, then the smaller."""
    scored = [r for r in results if r["accuracy"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["accuracy"], -abs(math.log(r["factor"])), -r["factor"]))
    return {"factor": best["factor"], "accuracy": best["accuracy"], "delta": best["delta"], "ci95": best["ci95"],
            "significant": bool(best["ci95"] and best["ci95"][0] > 0)}


def importance_ranking(step1_records: list[dict], ablated: np.ndarray, neurons: list[int], comparison) -> dict:
    """Single-neuron ablation impacts on held-out examples beside the step-1 (discovery) impacts."""
    step1 = {r["neuron"]: r["impact"] for r in step1_records}
    ranking = []
    for neuron, row in zip(neurons, ablated):
        entry = comparison.entry(row, neuron=int(neuron), step1_impact=step1[neuron])
        entry["impact"] = None if entry["delta"] is None else -entry["delta"]
        entry["ci95"] = None if entry["ci95"] is None else [-entry["ci95"][1], -entry["ci95"][0]]
        del entry["delta"]
        ranking.append(entry)
    ranking.sort(key=lambda r: (r["impact"] is None, -(r["impact"] or 0.0), r["neuron"]))
    pairs = [(r["step1_impact"], r["impact"]) for r in ranking if r["impact"] is not None and r["step1_impact"] is not None]
    return {"neurons": ranking, "spearman_step1_vs_heldout": spearman(*zip(*pairs)) if pairs else None}


def ranked_neurons(step1_records: list[dict], max_neurons: int | None, sample_neurons: int | None,
                   seed: int) -> list[int]:
    """Step-1 neurons for the ranking: the N of largest |impact|, or N drawn at random (seeded)."""
    records = [r for r in step1_records if r["impact"] is not None]
    if sample_neurons is not None:
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(records), size=min(sample_neurons, len(records)), replace=False)
        return sorted(records[i]["neuron"] for i in picked)
    records = sorted(records, key=lambda r: (-abs(r["impact"]), r["neuron"]))
    return [r["neuron"] for r in records[:max_neurons]]


def print_group_table(name: str, group: dict, baseline: float, layer: int) -> None:
    """The seed's console table for one group."""
    title = GROUP_TITLES.get(name, name)
    print(f"\n{title} neurons (n={len(group['neurons'])}) amplified at layer {layer}; baseline {baseline:.2f}%")
    if not group["neurons"]:
        print("  (empty group: nothing to amplify)")
        return
    print(f"  {'Factor':>7}  {'Accuracy':>8}  {'Δ':>7}  {'95% CI':>17}  Effect")
    for r in group["results"]:
        acc = "non-finite" if r["accuracy"] is None else f"{r['accuracy']:8.2f}"
        delta = "" if r["delta"] is None else f"{r['delta']:+7.2f}"
        ci = "" if r["ci95"] is None else f"[{r['ci95'][0]:+6.2f}, {r['ci95'][1]:+6.2f}]"
        print(f"  {r['factor']:>7g}  {acc:>8}  {delta:>7}  {ci:>17}  {r['label']}")
    best = group["optimal"]
    if best:
        verdict = "significant gain" if best["significant"] else "not significantly above baseline"
        print(f"  Optimal factor: {best['factor']:g} ({best['accuracy']:.2f}%, {best['delta']:+.2f}; {verdict})")
