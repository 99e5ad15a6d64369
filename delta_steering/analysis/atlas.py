"""The atlas: every delta neuron of every SSM layer screened by attribution from one forward and one
backward pass per batch, the top neurons of each layer re-measured exactly, and Benjamini-Hochberg
over every neuron of every layer (the unmeasured ones counted as p = 1, as step 1 counts them).

The atlas file (a contract like the step files: `format_version`, `step` "atlas", provenance, a
digest of its contents) holds per layer the estimates of every neuron and the exact records of the
verified ones; a layer's records make a step-1 file (`step1_result`) that step 2 reads like any other.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from ..artifacts import Discovery, Provenance, Results
from ..data.tasks import Example, example_ids
from .impacts import attach_estimates, discovery_result, neuron_impacts, print_recall, screen_note, screen_recall
from .metrics import chance_correctness, summarize
from .stats import SIGNIFICANCE, benjamini_hochberg, is_significant

DESCRIPTION = (
    "Delta atlas: every delta neuron of every listed SSM layer ablated alone, estimated to first order "
    "(attribution: one forward and one backward pass per batch for all layers), the verify_top neurons of each "
    "layer with the largest estimated impact re-measured exactly, and recall_sample of the other neurons (of all "
    "layers) at random, marked recall_sample, to measure the screen's recall (`recall`). Accuracies in percent (mean over tasks); impact = "
    "baseline - ablated accuracy in points (positive: the neuron helps); estimated_impact: the first-order "
    "estimate of it; ci95 = paired bootstrap 95% CI; p_value = exact sign test; q_value = Benjamini-Hochberg over "
    "every neuron of every layer (unmeasured neurons count as p = 1); q_value_layer = the same within the layer, "
    "as step 1 computes it.")


def layer_records(examples: list[Example], baseline: np.ndarray, rows: dict[int, np.ndarray],
                  estimates: list[dict], delta_variance: list[float], seed: int,
                  sampled: list[int] = ()) -> tuple[list[dict], dict]:
    """A layer's step-1 records: the measured neurons (`rows`: neuron -> correctness) exactly, those
    of the recall sample (`sampled`) marked `"recall_sample": true`, the others unmeasured; BH within
    the layer, as step 1 computes it; and the Spearman correlations of the estimates with the exact
    impacts."""
    measured = sorted(rows)
    unmeasured = sorted({e["neuron"] for e in estimates} - set(measured))
    ablated = np.array([rows[n] for n in measured], dtype=float).reshape(len(measured), len(examples))
    records = neuron_impacts(examples, baseline, ablated, measured, delta_variance, seed, unmeasured)
    for record in records:
        record["recall_sample"] = record["neuron"] in sampled
    return records, attach_estimates(records, estimates)


def atlas_q_values(records: dict[int, list[dict]]) -> dict[int, list[float]]:
    """Benjamini-Hochberg over every neuron of every layer (unmeasured: p = 1), in records' order."""
    layers = sorted(records)
    p_values = [r["p_value"] if r["measured"] and r["p_value"] is not None else 1.0
                for layer in layers for r in records[layer]]
    q_values, out, start = benjamini_hochberg(p_values), {}, 0
    for layer in layers:
        out[layer] = list(q_values[start: start + len(records[layer])])
        start += len(records[layer])
    return out


def layer_entry(layer: int, records: list[dict], q_values: list[float], spearman: dict, stats: dict) -> dict:
    """The atlas's record of one layer: every neuron's estimates in neuron order, the verified
    neurons' exact records (atlas-wide q_value, q_value_layer within the layer) and a summary."""
    by_neuron = sorted(records, key=lambda r: r["neuron"])
    verified = []
    for record, q in zip(records, q_values):
        if record["measured"]:
            verified.append({**copy.deepcopy(record), "q_value_layer": record["q_value"], "q_value": q})
    finite = [r for r in verified if r["impact"] is not None and r["impact"] != 0]  # an impact of 0 is no "largest"
    largest = max(finite, key=lambda r: (r["impact"], -r["neuron"]), default=None)
    return {
        "layer": layer,
        "estimated_impact": [r["estimated_impact"] for r in by_neuron],
        "estimated_margin_loss": [r["estimated_margin_loss"] for r in by_neuron],
        "delta_variance": [float(v) for v in stats["delta_variance"]],
        "dt_pre_mean": [float(v) for v in stats["dt_pre_mean"]],
        "verified": verified,
        "significant_neurons": sorted(r["neuron"] for r in verified if is_significant(r["q_value"])),
        "largest_verified": None if largest is None else {k: largest[k] for k in ("neuron", "impact", "ci95",
                                                                                    "q_value")},
        **spearman,
    }


def atlas_recall(entries: list[dict], total: int) -> dict:
    """The screen's recall over the whole atlas, from its recall sample: significance atlas-wide."""
    measured = [(e["layer"], r) for e in entries for r in e["verified"]]
    picks = [r for _, r in measured if not r["recall_sample"]]
    sample = [(layer, r) for layer, r in measured if r["recall_sample"]]
    return screen_recall(sum(is_significant(r["q_value"]) for r in picks),
                         [[layer, r["neuron"]] for layer, r in sample if is_significant(r["q_value"])], len(sample),
                         total - len(picks))


def atlas_result(examples: list[Example], baseline: np.ndarray, layers: list[dict], provenance: Provenance,
                 tasks: list[str], validation_size: int, **extra) -> Results:
    """The atlas file: what was measured on what (provenance: model, its digest, family), the
    baseline, and one entry per layer."""
    summary, chance = summarize(examples, baseline), summarize(examples, chance_correctness(examples))
    return Results(provenance, step="atlas", report={
        "description": DESCRIPTION,
        "tasks": tasks,
        "validation_size": validation_size,
        "baseline_accuracy": summary["accuracy"],
        "per_task_baseline": summary["per_task"],
        "chance_accuracy": chance["accuracy"],
        "num_examples": {t: sum(e.task == t for e in examples) for t in summary["per_task"]},
        "neurons_per_layer": len(layers[0]["estimated_impact"]) if layers else 0,
        "significant": [[entry["layer"], n] for entry in layers for n in entry["significant_neurons"]],
        "layers": layers,
        "discovery_examples": example_ids(examples),
        **extra,
    })


def step1_result(examples: list[Example], baseline: np.ndarray, records: list[dict], spearman: dict,
                 estimates: list[dict], stats: dict, provenance: Provenance, tasks: list[str],
                 validation_size: int, threshold: float, **extra) -> Discovery:
    """One layer of the atlas (`provenance.layer`) as a step-1 file: the fields step 1 with --method
    attribution writes (q-values within the layer), for step 2 to read."""
    verified = sorted(r["neuron"] for r in records if r["measured"] and not r["recall_sample"])
    sampled = sorted(r["neuron"] for r in records if r["recall_sample"])
    discovery = discovery_result(examples, baseline, records, threshold, provenance, tasks, validation_size, stats,
                                 method="attribution", neurons_tested=len(records), attribution_estimates=estimates,
                                 verified_neurons=verified, recall_sample_neurons=sampled, **spearman, **extra)
    return replace(discovery, report={**discovery.report, "screen": screen_note(discovery.report)})


def print_atlas(result: dict) -> None:
    """Per layer: how many neurons verified and significant, the largest verified impact with its CI;
    how many neurons were measured at all, and the screen's recall."""
    print(f"\nAtlas of {result['model']}: {len(result['layers'])} layers x {result['neurons_per_layer']} delta "
          f"neurons; baseline accuracy {result['baseline_accuracy']:.2f}%")
    print(f"{'layer':>5}  {'verified':>8}  {'significant':>11}  largest verified impact (points, 95% CI, atlas q)")
    for entry in result["layers"]:
        largest = entry["largest_verified"]
        shown = "none finite and non-zero" if largest is None else (
            f"neuron {largest['neuron']:>5}  {largest['impact']:+7.2f}  "
            f"[{largest['ci95'][0]:+6.2f}, {largest['ci95'][1]:+6.2f}]  q {largest['q_value']:.3g}")
        print(f"{entry['layer']:>5}  {len(entry['verified']):>8}  {len(entry['significant_neurons']):>11}  {shown}")
    total = result["neurons_per_layer"] * len(result["layers"])
    measured = sum(len(e["verified"]) for e in result["layers"])
    print(f"{measured} of {total} neurons measured exactly ({result['recall']['sample_size']} of them at random, the "
          "recall sample); the rest have no impact and count as p = 1 in BH")
    print(f"{len(result['significant'])} significant (BH q < {SIGNIFICANCE:g} over all {total} neurons)")
    print_recall(result["recall"])
