"""Step 1: each delta neuron ablated on its own, its impact on zero-shot accuracy measured with a
paired confidence interval, an exact sign test and Benjamini-Hochberg q-values; the step-1 file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..artifacts import HIGH_IMPACT, Discovery, Provenance, delta_sensitive, impact_groups, measured_finite
from ..data.tasks import example_ids
from .metrics import Comparison, chance_correctness, summarize
from .stats import (SIGNIFICANCE, below_detection, benjamini_hochberg, describe_detection_limit, is_significant,
                    proportion_ci, rounded, spearman)

DESCRIPTION = (
    "Step 1, delta neuron discovery: each neuron of `layer` ablated alone on the discovery examples. "
    "Accuracies in percent (mean over tasks of per-task accuracy); impact = baseline - ablated accuracy, in "
    "percentage points (positive: the neuron helps); ci95 = paired bootstrap 95% CI of the impact; p_value = "
    "exact sign test over the examples that changed; q_value = Benjamini-Hochberg over every requested neuron. "
    "groups: high_impact (impact > high_impact_cut points) and neutral (|impact| <= high_impact_cut), the sets "
    "step 2 amplifies; the cut is a size, not a significance test. beneficial_neurons: impact >= threshold (the "
    "original study's list). minimum_detectable_effect: the smallest impact (points) a single-neuron ablation on "
    "these examples detects with 80% power at alpha 0.05, from the observed share of examples that changed. "
    "delta_variance: per neuron, the variance of Delta = softplus(dt_pre) over the tokens of the statistics Pile "
    "documents; delta_variance_ranking orders every neuron by it. method: exact, or attribution (a screen: "
    "attribution_estimates of every neuron, verified_neurons its top measured exactly, recall_sample_neurons a seeded "
    "random sample of the rest measured exactly, recall the screen's estimated recall from that sample, screen what "
    "was measured).")


def neuron_chunks(neurons: list[int], size: int) -> list[list[int]]:
    """The sweep's units of work and of checkpointing. Their composition is fixed by the neuron list
    alone, so a resumed or distributed run computes every row exactly as an uninterrupted one does."""
    return [neurons[start: start + size] for start in range(0, len(neurons), size)]


def neuron_impacts(examples, baseline: np.ndarray, ablated: np.ndarray, neurons: list[int],
                   delta_variance: list[float], seed: int, unmeasured: list[int] = ()) -> list[dict]:
    """One record per neuron: ablated accuracy, impact = baseline - ablated (points), per-task
    accuracies, paired bootstrap CI of the impact, exact sign-test p-value and BH q-value.

    `unmeasured` neurons (screened out by attribution) get a record with `"measured": false` and no
    impact; Benjamini-Hochberg still counts them, as p = 1, so screening cannot shrink the correction."""
    comparison = Comparison(examples, baseline, seed)
    records = []
    for neuron, row in zip(neurons, ablated):
        entry = comparison.impact(row, neuron=int(neuron), measured=True)
        entry["examples_lost"] = int(np.nansum((baseline == 1) & (row == 0)))
        entry["examples_gained"] = int(np.nansum((baseline == 0) & (row == 1)))
        entry["delta_variance"] = float(delta_variance[neuron])
        records.append(entry)
    records += [{"neuron": int(n), "measured": False, "impact": None, "accuracy": None, "p_value": None,
                 "delta_variance": float(delta_variance[n])} for n in unmeasured]
    p_values = [r["p_value"] if r["measured"] else 1.0 for r in records]
    for record, q in zip(records, benjamini_hochberg(p_values)):
        record["q_value"] = q
    records.sort(key=lambda r: (not r["measured"], r["impact"] is None, -(r["impact"] or 0.0), r["neuron"]))
    return records


def discovery_result(examples, baseline: np.ndarray, records: list[dict], threshold: float, provenance: Provenance,
                     tasks: list[str], validation_size: int, delta_stats: dict, data_dir: str | None = None,
                     ablation: str = "zero", high_impact_cut: float = HIGH_IMPACT, **extra) -> Discovery:
    """The step-1 file: the original study's fields first, then what later steps read and what a
    researcher needs to trust and reuse them."""
    summary, chance = summarize(examples, baseline), summarize(examples, chance_correctness(examples))
    impacts = measured_finite(records)
    groups = impact_groups(records, high_impact_cut)
    discovery = Discovery(provenance, tasks=tasks, data_dir=data_dir, ablation=ablation, records=records, groups=groups,
                          high_impact_cut=high_impact_cut,
                          delta_variance=[float(v) for v in delta_stats["delta_variance"]],
                          dt_pre_mean=[float(v) for v in delta_stats["dt_pre_mean"]])
    report = {
        "beneficial_neurons": sorted(r["neuron"] for r in impacts if r["impact"] >= threshold),
        "baseline_accuracy": summary["accuracy"],
        "criterion": f"impact >= {threshold} points",
        "description": DESCRIPTION,
        "validation_size": validation_size,
        "measured_neurons": sum(r["measured"] for r in records),
        "num_examples": {t: sum(e.task == t for e in examples) for t in summary["per_task"]},
        "per_task_baseline": summary["per_task"],
        "chance_accuracy": chance["accuracy"],
        "per_task_chance": chance["per_task"],
        "threshold": threshold,
        "significant_neurons": sorted(r["neuron"] for r in records if is_significant(r["q_value"])),
        "high_variance_neurons": discovery.variance_ranking[: len(delta_sensitive(records, groups))],
        "delta_statistics_tokens": int(delta_stats["num_tokens"]),
        "delta_statistics_documents": delta_stats.get("documents"),
        "discovery_examples": example_ids(examples),
        **extra,
    }
    return replace(discovery, report=report)


def print_summary(result: dict, top: int = 10) -> None:
    records = measured_finite(result["all_neuron_impacts"])
    unmeasured = sum(not r["measured"] for r in result["all_neuron_impacts"])

    def line(r):
        ci = r["ci95"] or [float("nan")] * 2
        return (f"  neuron {r['neuron']:>5}  impact {r['impact']:+7.2f}  [{ci[0]:+6.2f}, {ci[1]:+6.2f}]  "
                f"acc {r['accuracy']:6.2f}  q {r['q_value']:.3g}")

    print(f"\nTop {min(top, len(records))} impacts (baseline - ablated, points; 95% CI; BH q):")
    for r in records[:top]:
        print(line(r))
    print(f"Lowest {min(top, len(records))} impacts:")
    for r in records[-top:][::-1]:
        print(line(r))
    broken = len(result["all_neuron_impacts"]) - len(records) - unmeasured
    if unmeasured:
        print(f"\n{len(result['all_neuron_impacts']) - unmeasured} of {len(result['all_neuron_impacts'])} neurons "
              f"measured exactly; the other {unmeasured} were screened out by attribution (no impact, in no "
              "group; counted as p = 1 by BH)")
    print(f"\n{len(result['beneficial_neurons'])} beneficial ({result['criterion']}), "
          f"{len(result['groups']['high_impact'])} High Impact (impact > {result['high_impact_cut']:g}), "
          f"{len(result['groups']['neutral'])} Neutral (|impact| <= {result['high_impact_cut']:g}), "
          f"{len(result['significant_neurons'])} significant (q < {SIGNIFICANCE}) of {len(result['all_neuron_impacts'])}"
          + (f"; {broken} with non-finite logits" if broken else ""))
    limit = result.get("minimum_detectable_effect")
    if limit:
        below = sum(below_detection(r["impact"], limit) for r in records)
        print(describe_detection_limit(limit)
              + (f"\n{below} of {len(records)} measured impacts are below it: too small for this run to tell "
                 "from no effect" if below else ""))


def print_spearman(screened: dict, measured: int) -> None:
    """How the screen's estimates rank the measured neurons (its picks and its recall sample)
    against their exact impacts."""
    shown = ["n/a" if screened[k] is None else f"{screened[k]:.3f}"
             for k in ("spearman_estimated_impact", "spearman_margin_loss")]
    print(f"attribution vs exact impact on the {measured} neurons measured exactly (the screen's top and its recall "
          f"sample): Spearman {shown[0]} (estimated impact), {shown[1]} (estimated margin loss)")


def estimate_records(neurons: list[int], impact: np.ndarray, margin_loss: np.ndarray) -> list[dict]:
    """One record per neuron of its first-order estimates (indexed by neuron id)."""
    return [{"neuron": int(n), "estimated_impact": rounded(impact[n]),
             "estimated_margin_loss": float(margin_loss[n])} for n in neurons]


def top_estimated(estimates: list[dict], top: int) -> list[int]:
    """The `top` neurons to re-measure exactly, sorted by id: largest estimated impact, then margin loss."""
    ranked = sorted(estimates, key=lambda e: (-e["estimated_impact"], -e["estimated_margin_loss"], e["neuron"]))
    return sorted(e["neuron"] for e in ranked[:top])


def recall_sample(screened_out: list, size: int, seed: int) -> list:
    """A seeded uniform sample, without replacement, of the neurons a screen did not pick (any
    hashable ids, such as (layer, neuron)), in their given order: measured exactly, it bounds how
    many significant neurons the screen missed."""
    picked = np.random.default_rng(seed).choice(len(screened_out), min(size, len(screened_out)), replace=False)
    return [screened_out[k] for k in sorted(picked)]


def screen_recall(verified_significant: int, sample_significant: list, sample_size: int, screened_out: int) -> dict:
    """The screen's recall estimated from its recall sample: of the neurons that would test
    significant, the share it picked. Missed = the sample's significant neurons plus the rest of the
    screened-out neurons times the sample's share (Clopper-Pearson 95% CI); recall = verified /
    (verified + missed), its CI from the CI of missed. None where no neuron tested significant."""
    hits, rest = len(sample_significant), screened_out - sample_size
    share = hits / sample_size if sample_size else 0.0
    low, high = proportion_ci(hits, sample_size) if sample_size else (0.0, 0.0)
    missed = [hits + rest * p for p in (share, high, low)]  # estimate, then the bounds that give recall's CI

    def recall(m: float) -> float | None:
        total = verified_significant + m
        return round(verified_significant / total, 4) if total > 0 else None

    estimate, lower, upper = (recall(m) for m in missed)
    return {"screened_out": screened_out, "sample_size": sample_size, "sample_significant": sample_significant,
            "verified_significant": verified_significant, "estimated_missed": round(missed[0], 2),
            "missed_ci95": [round(missed[2], 2), round(missed[1], 2)], "estimated_recall": estimate,
            "recall_ci95": None if estimate is None else [lower, upper],
            "description": "recall: of the neurons that test significant (the same BH q < 0.05 as the verified ones), "
                           "the share the screen picked; missed = the significant neurons of a seeded random sample "
                           "of the screened-out neurons (measured exactly) plus the rest of them times the sample's "
                           "share (Clopper-Pearson 95% CI)"}


def screen_note(report: dict) -> str | None:
    """What a step-1 file from an attribution screen measured, in a sentence (None for an exact run):
    the screen's picks and its recall sample measured exactly, the others not at all."""
    if report.get("method") != "attribution":
        return None
    verified, sampled = report.get("verified_neurons") or [], report.get("recall_sample_neurons") or []
    recall = report.get("recall") or {}
    shown = "not measured" if recall.get("estimated_recall") is None else (
        "{:.0%} (95% CI {:.0%}-{:.0%})".format(recall["estimated_recall"], *recall["recall_ci95"]))
    return (f"an attribution screen: only {len(verified)} neurons it picked and {len(sampled)} at random (its recall "
            f"sample) of {report.get('neurons_tested')} were measured exactly; the others have no impact, count as "
            f"p = 1 and belong to no group; the screen's estimated recall: {shown}")


def print_recall(recall: dict) -> None:
    """The screen's measured recall, in one paragraph."""
    found = ", ".join(str(n) for n in recall["sample_significant"]) or "none"
    print(f"recall of the screen: a random sample of {recall['sample_size']} of the {recall['screened_out']} neurons "
          f"it screened out, measured exactly, holds {len(recall['sample_significant'])} significant ({found})")
    if recall["estimated_recall"] is None:
        print("  no neuron tested significant: recall undefined")
        return
    low, high = recall["recall_ci95"]
    fewest, most = recall["missed_ci95"]
    print(f"  estimated recall {recall['estimated_recall']:.0%} (95% CI {low:.0%}-{high:.0%}): "
          f"{recall['verified_significant']} significant among the picked, about "
          f"{recall['estimated_missed']:.0f} missed (95% CI {fewest:.0f}-{most:.0f})")


def attach_estimates(records: list[dict], estimates: list[dict]) -> dict:
    """Put each neuron's estimate beside its exact impact; Spearman correlations of both."""
    by_neuron = {e["neuron"]: e for e in estimates}
    for record in records:
        if record["neuron"] in by_neuron:
            record.update({k: v for k, v in by_neuron[record["neuron"]].items() if k != "neuron"})
    exact = [r for r in records if r["impact"] is not None]  # measured exactly, finite
    return {
        "spearman_estimated_impact": spearman([r["estimated_impact"] for r in exact], [r["impact"] for r in exact]),
        "spearman_margin_loss": spearman([r["estimated_margin_loss"] for r in exact], [r["impact"] for r in exact]),
    }
