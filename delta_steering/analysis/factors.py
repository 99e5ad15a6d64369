"""Step 2: amplify each group of step-1 neurons as a whole by each factor on held-out examples,
choose each group's factor on a selection half and confirm it on the other half, and check whether
single-neuron impacts replicate.

The baseline (factor 1, no steering) is a candidate like any factor: a group's factor is a factor
other than 1 only when it beats the baseline on the selection half. Its gain, CI and p-value are then
reported on the confirmation half only, one pre-registered test per group, so no reported gain is
measured on the examples that chose it.
"""

from __future__ import annotations

import math
import random

import numpy as np

from ..artifacts import GROUP_TITLES, factor_to_steer, measured_finite
from .metrics import Comparison, describe_change, example_weights, perplexity_change, perplexity_of
from .stats import SIGNIFICANCE, below_detection, benjamini_hochberg, detection_limit, is_significant, spearman
from .verification import factor_source_text

DESCRIPTION = (
    "Step 2, steering factors: step 1's High Impact and Neutral groups, each amplified as a whole at `layer`. "
    "Accuracies in percent (mean over tasks of per-task accuracy). groups.<g>.results: the selection-half table, "
    "factor 1 (the baseline) first; delta = accuracy - baseline (points), ci95 = paired bootstrap 95% CI of delta, "
    "p_value = exact sign test, q_value = Benjamini-Hochberg over the group's factors, label = the measured verdict "
    "(significant gain, significant loss, no significant change). optimal_factors.<g>: the "
    "factor chosen on the selection half (1.0 when none beats the baseline) and its one test on the confirmation "
    "half (significant: sign-test p < 0.05 with a positive delta). importance_ranking: single neurons ablated on "
    "all held-out examples, impact = baseline - ablated (points). minimum_detectable_effect: the smallest gain "
    "(points) the confirmation half detects with 80% power at alpha 0.05, from the share of its examples the "
    "factors changed. perplexity: Pile perplexity with the High Impact group steered at each layer; each "
    "<kind>_change holds delta = perplexity - baseline and relative = percent change, each with a per-document "
    "paired bootstrap 95% CI (ci95, relative_ci95).")
SELECTION_SEED = 4321  # fixed, independent of --seed: the selection/confirmation split never moves


def mark(delta: float | None, q_value: float | None) -> str:
    """✓ significant gain, ✗ significant loss (BH q < 0.05 over the group's factors), ~ neither."""
    if delta is None or q_value is None:
        return "?"
    if is_significant(q_value):
        return "✓" if delta > 0 else "✗" if delta < 0 else "~"
    return "~"


def measured_verdict(delta: float | None, q_value: float | None) -> str:
    """What the selection half measured for a factor, in words, after its mark."""
    words = {"✓": "significant gain", "✗": "significant loss", "~": "no significant change",
             "?": "not scored (non-finite logits)"}
    symbol = mark(delta, q_value)
    return f"{symbol} {words[symbol]}"


def selection_split(examples) -> tuple[list[int], list[int]]:
    """Positions of the selection and confirmation halves of the held-out examples: per task, a
    fixed-seed shuffle, its first half (rounded up) for selection and the rest for confirmation."""
    selection, confirmation = [], []
    for task in dict.fromkeys(e.task for e in examples):
        members = [i for i, e in enumerate(examples) if e.task == task]
        random.Random(SELECTION_SEED).shuffle(members)
        half = (len(members) + 1) // 2
        selection += sorted(members[:half])
        confirmation += sorted(members[half:])
    return sorted(selection), sorted(confirmation)


def factor_table(comparison: Comparison, factors: list[float], rows: list[np.ndarray]) -> list[dict]:
    """The selection table: the baseline (factor 1), then one entry per factor with its BH q-value
    over the group's factors and a label."""
    base = comparison.base
    table = [{"factor": 1.0, "accuracy": base["accuracy"], "delta": 0.0, "per_task": base["per_task"],
              "ci95": None, "p_value": None, "q_value": None, "label": "baseline"}]
    entries = [comparison.entry(correct, factor=float(factor)) for factor, correct in zip(factors, rows)]
    for entry, q in zip(entries, benjamini_hochberg([e["p_value"] for e in entries])):
        entry["q_value"] = q
        entry["label"] = measured_verdict(entry["delta"], q)
    return table + entries


def selection_best(table: list[dict]) -> dict | None:
    """The steering factor (not 1) of highest selection accuracy; ties go to the factor closest to 1
    in log scale, then the smaller."""
    scored = [r for r in table if r["factor"] != 1 and r["accuracy"] is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["accuracy"], -abs(math.log(r["factor"])), -r["factor"]))


def optimal_factor(table: list[dict], confirmation: Comparison, rows: dict[float, np.ndarray]) -> dict | None:
    """The group's factor: the selection-best factor if it beats the baseline on the selection half,
    else 1.0 (no steering). A chosen factor is tested once on the confirmation half (`rows`: the
    confirmation correctness per factor)."""
    best = selection_best(table)
    if best is None:
        return None
    beats = best["delta"] > 0
    result = {"factor": best["factor"] if beats else 1.0, "beats_baseline": beats,
              "selection_best_factor": best["factor"],
              "selection": {"accuracy": best["accuracy"], "delta": best["delta"], "q_value": best["q_value"]},
              "confirmation": None, "confirmed": False}
    if beats:
        entry = confirmation.entry(rows[best["factor"]])
        significant = entry["p_value"] is not None and entry["p_value"] < SIGNIFICANCE and (entry["delta"] or 0) > 0
        result["confirmation"] = {"accuracy": entry["accuracy"], "baseline_accuracy": confirmation.base["accuracy"],
                                  "delta": entry["delta"], "ci95": entry["ci95"], "p_value": entry["p_value"],
                                  "significant": significant}
        result["confirmed"] = significant
    return result


def group_result(neurons: list[int], factors: list[float], rows: dict[float, np.ndarray], examples,
                 baseline: np.ndarray, seed: int) -> dict:
    """A group's selection table and optimal factor from the held-out correctness of every factor
    (`rows`), split into the selection and confirmation halves."""
    selection, confirmation = selection_split(examples)
    group = {"neurons": neurons, "selection_size": len(selection), "confirmation_size": len(confirmation),
             "results": [], "optimal": None}
    if neurons:
        def comparison(part):
            return Comparison([examples[i] for i in part], baseline[part], seed)

        group["results"] = factor_table(comparison(selection), factors, [rows[f][selection] for f in factors])
        group["optimal"] = optimal_factor(group["results"], comparison(confirmation),
                                          {f: row[confirmation] for f, row in rows.items()})
    return group


def confirmation_limit(examples, baseline: np.ndarray, rows: list[np.ndarray]) -> dict:
    """The minimum detectable effect of the confirmation half: its examples, weighted as accuracy
    weighs them, and the share of them that the amplified groups (`rows`, all held-out examples) change."""
    _, confirmation = selection_split(examples)
    return detection_limit(baseline[confirmation], [np.asarray(r, float)[confirmation] for r in rows],
                           example_weights([examples[i] for i in confirmation]),
                           "a group's factor vs the baseline on the confirmation half")


def importance_ranking(step1_records: list[dict], ablated: list[np.ndarray], neurons: list[int],
                       comparison: Comparison) -> dict:
    """Single-neuron ablation impacts on held-out examples beside the step-1 (discovery) impacts."""
    step1 = {r["neuron"]: r["impact"] for r in step1_records}
    ranking = [comparison.impact(row, neuron=int(neuron), step1_impact=step1[neuron])
               for neuron, row in zip(neurons, ablated)]
    ranking.sort(key=lambda r: (r["impact"] is None, -(r["impact"] or 0.0), r["neuron"]))
    pairs = [(r["step1_impact"], r["impact"]) for r in ranking
             if r["impact"] is not None and r["step1_impact"] is not None]
    return {"neurons": ranking, "spearman_step1_vs_heldout": spearman(*zip(*pairs)) if pairs else None}


def ranked_neurons(step1_records: list[dict], max_neurons: int | None, sample_neurons: int | None,
                   seed: int) -> list[int]:
    """Step-1 neurons for the ranking: the N of largest |impact|, or N drawn at random (seeded)."""
    records = measured_finite(step1_records)
    if sample_neurons is not None:
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(records), size=min(sample_neurons, len(records)), replace=False)
        return sorted(records[i]["neuron"] for i in picked)
    records = sorted(records, key=lambda r: (-abs(r["impact"]), r["neuron"]))
    return [r["neuron"] for r in records[:max_neurons]]


def print_group_table(name: str, group: dict, layer: int, limit: dict | None = None) -> None:
    """One group's selection table and its verdict: chosen factor, confirmation (said to be below the
    minimum detectable effect `limit` when it is), or no factor."""
    title = GROUP_TITLES.get(name, name)
    print(f"\n{title} neurons (n={len(group['neurons'])}) amplified at layer {layer}")
    if not group["neurons"]:
        print("  (empty group: nothing to amplify)")
        return
    print(f"  selection half ({group['selection_size']} examples; q: BH over the group's factors)")
    print(f"  {'Factor':>7}  {'Accuracy':>8}  {'Δ':>7}  {'95% CI':>17}  {'q':>8}  Measured")
    for r in group["results"]:
        acc = "non-finite" if r["accuracy"] is None else f"{r['accuracy']:8.2f}"
        delta = "" if r["delta"] is None or r["factor"] == 1 else f"{r['delta']:+7.2f}"
        ci = "" if r["ci95"] is None else f"[{r['ci95'][0]:+6.2f}, {r['ci95'][1]:+6.2f}]"
        q = "" if r["q_value"] is None else f"{r['q_value']:8.3g}"
        print(f"  {r['factor']:>7g}  {acc:>8}  {delta:>7}  {ci:>17}  {q:>8}  {r['label']}")
    print("  " + verdict(title, group["optimal"], group["confirmation_size"]))
    confirmation = (group["optimal"] or {}).get("confirmation") or {}
    if limit and below_detection(confirmation.get("delta"), limit):
        print(f"  the confirmation Δ {confirmation['delta']:+.2f} is below the minimum detectable effect of the "
              f"confirmation half ({limit['points']:.2f} points): this run could not have told it from no effect")


def verdict(title: str, optimal: dict | None, confirmation_size: int) -> str:
    """One line: which factor the group gets and whether the confirmation half confirmed it."""
    if optimal is None:
        return f"no factor could be scored for the {title} group (non-finite logits)"
    if not optimal["beats_baseline"]:
        return (f"no factor beats the baseline for the {title} group (best on selection: "
                f"x{optimal['selection_best_factor']:g}, {optimal['selection']['delta']:+.2f} points)")
    c = optimal["confirmation"]
    shown = "non-finite" if c["accuracy"] is None else (
        f"{c['accuracy']:.2f}% vs baseline {c['baseline_accuracy']:.2f}%, Δ {c['delta']:+.2f} "
        f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}], sign-test p {c['p_value']:.3g}")
    conclusion = "significant gain: confirmed" if c["significant"] else "not significant: unconfirmed"
    return (f"chosen on selection: x{optimal['factor']:g} ({optimal['selection']['delta']:+.2f}); "
            f"confirmation half ({confirmation_size} examples): {shown}; {conclusion}")


def perplexity_table(neurons: list[int], layers: list[int], documents: dict, losses: dict, optimal: dict | None,
                     seed: int) -> dict:
    """Pile perplexity at baseline and with the High Impact neurons ablated / amplified at each layer,
    amplified by the confirmed factor, else the selection-best one (marked unconfirmed); each change
    from the baseline with its per-document paired bootstrap CI. `losses`: (layer, factor) -> the
    document losses, (None, None) the baseline's."""
    factor, source = factor_to_steer(optimal)
    base = losses[(None, None)]
    table = {"baseline": perplexity_of(base), "neurons": neurons, "factor": factor, "factor_source": source,
             "documents": documents, "layers": []}
    print(f"\nPile perplexity ({documents['count']} documents, baseline {table['baseline']:.4f}), High Impact "
          "neurons steered at each layer; change from baseline, 95% CI over documents:")
    kinds = {"ablated": 0.0} if factor is None else {"ablated": 0.0, "amplified": factor}
    for layer in layers:
        entry = {"layer": layer}
        for kind, k in kinds.items():
            entry[kind] = perplexity_of(losses[(layer, k)])
            entry[f"{kind}_change"] = perplexity_change(base, losses[(layer, k)], seed)
        table["layers"].append(entry)
        print(f"  layer {layer:>3}: " + "; ".join(
            describe_change(f"{kind} x{k:g}", entry[kind], entry[f"{kind}_change"]) for kind, k in kinds.items()))
    if factor is not None:
        print(f"  amplified by x{factor:g}: {factor_source_text(source)}")
    return table
