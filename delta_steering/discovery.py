"""Step 1: each delta neuron ablated on its own, its impact on zero-shot accuracy measured with a
paired confidence interval and sign test; the step-1 file read back by steps 2 and 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cli import UsageError
from .results_io import read_json
from .scoring import chance_correctness, example_weights, summarize
from .stats import benjamini_hochberg, bootstrap_indices, paired_ci, sign_test
from .sweep import Intervention
from .tasks import example_ids

HIGH_IMPACT = 2.0  # percentage points: step 2's High Impact group is impact > 2, Neutral is |impact| <= 2
SIGNIFICANCE = 0.05


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
    weights = example_weights(examples)
    indices = bootstrap_indices(np.array([e.task for e in examples]), seed=seed)
    base_accuracy = summarize(examples, baseline)["accuracy"]
    records = []
    for neuron, row in zip(neurons, ablated):
        summary = summarize(examples, row)
        accuracy = summary["accuracy"]
        records.append({
            "neuron": int(neuron),
            "measured": True,
            "impact": None if accuracy is None else round(base_accuracy - accuracy, 4),
            "accuracy": accuracy,
            "per_task": summary["per_task"],
            "ci95": paired_ci(row, baseline, weights, indices),  # CI of baseline - ablated
            "p_value": sign_test(baseline, row),
            "examples_lost": int(np.nansum((baseline == 1) & (row == 0))),
            "examples_gained": int(np.nansum((baseline == 0) & (row == 1))),
            "delta_variance": float(delta_variance[neuron]),
            **({"non_finite": summary["non_finite"]} if summary["non_finite"] else {}),
        })
    records += [{"neuron": int(n), "measured": False, "impact": None, "accuracy": None, "p_value": None,
                 "delta_variance": float(delta_variance[n])} for n in unmeasured]
    p_values = [r["p_value"] if r["measured"] else 1.0 for r in records]
    for record, q in zip(records, benjamini_hochberg(p_values)):
        record["q_value"] = q
    records.sort(key=lambda r: (not r["measured"], r["impact"] is None, -(r["impact"] or 0.0), r["neuron"]))
    return records


def is_significant(record: dict) -> bool:
    """BH q < 0.05 (q = 0, from a p-value that underflowed, included)."""
    return record.get("q_value") is not None and record["q_value"] < SIGNIFICANCE


def discovery_result(examples, baseline: np.ndarray, records: list[dict], threshold: float, layer: int,
                     model_name: str, tasks: list[str], validation_size: int, delta_stats: dict, **extra) -> dict:
    """The step-1 JSON: the seed's four fields first, then what is needed to trust and reuse them."""
    summary, chance = summarize(examples, baseline), summarize(examples, chance_correctness(examples))
    impacts = [r for r in records if r["impact"] is not None]
    delta_variance = [float(v) for v in delta_stats["delta_variance"]]
    return {
        "beneficial_neurons": sorted(r["neuron"] for r in impacts if r["impact"] >= threshold),
        "baseline_accuracy": summary["accuracy"],
        "criterion": f"impact >= {threshold}%",
        "all_neuron_impacts": records,
        "layer": layer,
        "model": model_name,
        "tasks": tasks,
        "validation_size": validation_size,
        "measured_neurons": sum(r["measured"] for r in records),
        "num_examples": {t: sum(e.task == t for e in examples) for t in summary["per_task"]},
        "per_task_baseline": summary["per_task"],
        "chance_accuracy": chance["accuracy"],
        "per_task_chance": chance["per_task"],
        "threshold": threshold,
        "high_impact_neurons": sorted(r["neuron"] for r in impacts if r["impact"] > HIGH_IMPACT),
        "neutral_neurons": sorted(r["neuron"] for r in impacts if abs(r["impact"]) <= HIGH_IMPACT),
        "significant_neurons": sorted(r["neuron"] for r in records if is_significant(r)),
        "delta_variance": delta_variance,
        "dt_pre_mean": [float(v) for v in delta_stats["dt_pre_mean"]],
        "high_variance_neurons": [int(i) for i in np.argsort(-np.array(delta_variance), kind="stable")],
        "delta_statistics_tokens": int(delta_stats["num_tokens"]),
        "delta_statistics_documents": delta_stats.get("documents"),
        "discovery_examples": example_ids(examples),
        **extra,
    }


def print_summary(result: dict, top: int = 10) -> None:
    records = [r for r in result["all_neuron_impacts"] if r["impact"] is not None]
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
          f"{len(result['high_impact_neurons'])} high impact (> {HIGH_IMPACT}), "
          f"{len(result['significant_neurons'])} significant (q < {SIGNIFICANCE}) of {len(result['all_neuron_impacts'])}"
          + (f"; {broken} with non-finite logits" if broken else ""))


STEP1_DEFAULTS = ("discovered_neurons.json", "ablation_3_results/discovered_neurons.json")


def locate(explicit: str | None, defaults: tuple[str, ...], what: str, flag: str) -> Path:
    """The file given by `flag`, else the first default that exists; a UsageError lists the paths tried."""
    tried = [explicit] if explicit else list(defaults)
    for candidate in tried:
        if Path(candidate).is_file():
            return Path(candidate)
    raise UsageError(f"{what} not found (tried {', '.join(tried)}); pass {flag} PATH")


def same_model(a: str | None, b: str) -> bool:
    """Model names match, comparing local directories by their real path."""
    if a is None:
        return True
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_discovery(path: Path, model, model_name: str, allow_model_mismatch: bool = False) -> dict:
    """A validated step-1 JSON: required fields present, neuron ids within the model's layer."""
    from .steering import num_delta_neurons, num_layers

    data = read_json(path, "step-1 file")
    records = data.get("all_neuron_impacts") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "neuron" in r and "impact" in r
                                                for r in records):
        raise UsageError(f"step-1 file {path} is malformed: it needs all_neuron_impacts, a list of "
                         "{\"neuron\", \"impact\"} records")
    n = num_delta_neurons(model)
    bad = [r["neuron"] for r in records if not isinstance(r["neuron"], int) or not 0 <= r["neuron"] < n]
    if bad:
        raise UsageError(f"step-1 file {path}: neuron {bad[0]} out of range, the model has delta neurons 0-{n - 1}")
    layer = data.get("layer", 20)
    if not isinstance(layer, int) or not 0 <= layer < num_layers(model):
        raise UsageError(f"step-1 file {path}: layer {layer} out of range for this model (0-{num_layers(model) - 1})")
    if not allow_model_mismatch and not same_model(data.get("model"), model_name):
        raise UsageError(f"step-1 file {path} was made with model {data.get('model')!r}, not {model_name!r}; "
                         "pass --allow_model_mismatch to use it anyway")
    return data


def impact_groups(data: dict) -> dict[str, list[int]]:
    """Step 2's groups from step-1 impacts: High Impact (> 2 points) and Neutral (|impact| <= 2)."""
    records = [r for r in data["all_neuron_impacts"] if r["impact"] is not None]
    return {
        "high_impact": sorted(r["neuron"] for r in records if r["impact"] > HIGH_IMPACT),
        "neutral": sorted(r["neuron"] for r in records if abs(r["impact"]) <= HIGH_IMPACT),
    }


def attribution_screen(model, tokenizer, examples, encoded, layer: int, neurons: list[int],
                       intervention: Intervention, batch_size: int | None, top: int) -> tuple[list[dict], list[int]]:
    """First-order estimates of every neuron's ablation effect (one forward and backward pass per
    batch), and the `top` neurons to re-measure exactly: largest estimated impact, then margin loss."""
    from .fast_sweep import attribution, estimated_impacts

    att = attribution(model, tokenizer, examples, encoded, layer, intervention, batch_size, progress=True)
    impact, margin_loss = estimated_impacts(examples, att)
    estimates = [{"neuron": n, "estimated_impact": round(float(impact[n]), 4),
                  "estimated_margin_loss": float(margin_loss[n])} for n in neurons]
    ranked = sorted(estimates, key=lambda e: (-e["estimated_impact"], -e["estimated_margin_loss"], e["neuron"]))
    return estimates, sorted(e["neuron"] for e in ranked[:top])


def attach_estimates(records: list[dict], estimates: list[dict]) -> dict:
    """Put each verified neuron's estimate beside its exact impact; Spearman correlations of both."""
    from .stats import spearman

    by_neuron = {e["neuron"]: e for e in estimates}
    for record in records:
        if record["neuron"] in by_neuron:
            record.update({k: v for k, v in by_neuron[record["neuron"]].items() if k != "neuron"})
    exact = [r for r in records if r["impact"] is not None]  # measured exactly, finite
    return {
        "spearman_estimated_impact": spearman([r["estimated_impact"] for r in exact], [r["impact"] for r in exact]),
        "spearman_margin_loss": spearman([r["estimated_margin_loss"] for r in exact], [r["impact"] for r in exact]),
    }
