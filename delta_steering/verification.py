"""Step 3: steered configurations evaluated on IFEval (greedy generation) and Pile perplexity, each
compared with the baseline on the same prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .artifacts import Discovery, delta_sensitive
from .generation import generate_greedy
from .ifeval import METRICS, score_responses
from .intervention import Intervention, Steering
from .perplexity import perplexity
from .stats import bootstrap_indices, compare
from .steering import apply

MODES = ("combined", "cluster_ablation", "layer_ablation")
DESCRIPTION = (
    "Step 3, verification: each configuration (a neuron set steered by `factor` or ablated, at a layer) and the "
    "baseline on the same IFEval prompts (greedy generation) and Pile documents. IFEval metrics in percent; "
    "accuracy = the ifeval_metric; delta = accuracy - baseline (points), ci95 = paired bootstrap 95% CI of delta "
    "over prompts, p_value = exact sign test over the prompts whose score changed; perplexity = exp(mean token "
    "NLL) on the evaluation Pile documents, perplexity_delta = perplexity - baseline's. factor_source: "
    "command-line, step2-confirmed, or step2-unconfirmed (step 2's selection-best factor, not confirmed).")
FACTOR_SOURCES = {"command-line": "given with --factor",
                  "step2-confirmed": "step 2's High Impact factor, confirmed on its confirmation half",
                  "step2-unconfirmed": "step 2's selection-best High Impact factor, NOT confirmed on its "
                                       "confirmation half"}


BASELINE = Steering()  # no steering


def neuron_sets(step1: Discovery, n_delta_neurons: int, seed: int) -> tuple[dict[str, list[int]], list[str]]:
    """Delta-sensitive (step 1's High Impact group, else its top 20), random (same size, disjoint,
    seeded) and high-variance (same size, top delta variance) sets, plus warnings to print."""
    warnings = []
    sensitive = delta_sensitive(step1.records, step1.groups)
    if not step1.groups["high_impact"]:
        warnings.append(f"step 1 found no High Impact neuron (impact > 2); using its top {len(sensitive)} by impact")
    others = np.array(sorted(set(range(n_delta_neurons)) - set(sensitive)))
    rng = np.random.default_rng(seed)
    random_set = sorted(int(i) for i in rng.choice(others, size=min(len(sensitive), len(others)), replace=False))
    sets = {"delta_sensitive": sensitive, "random": random_set,
            "high_variance": sorted(step1.variance_ranking[: len(sensitive)])}
    return {k: v for k, v in sets.items() if v}, warnings


def configurations(mode: str, sets: dict[str, list[int]], layer: int, layers: list[int], factor: float,
                   ablation: str, dt_pre_mean: list[float]) -> dict[str, Steering]:
    """The configurations a mode runs, by name, baseline first. Cluster ablation removes each set as
    step 1 removed single neurons (zero or mean ablation)."""
    if mode == "combined":
        steered = {f"{k}_L{layer}": Steering(layer, Intervention.scale(v, factor)) for k, v in sets.items()}
    elif mode == "cluster_ablation":
        steered = {f"ablate_{k}_L{layer}": Steering(layer, Intervention.ablation(ablation, v, dt_pre_mean))
                   for k, v in sets.items()}
    elif mode == "layer_ablation":
        steered = {f"delta_sensitive_L{at}": Steering(at, Intervention.scale(sets["delta_sensitive"], factor))
                   for at in layers}
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {"baseline": BASELINE, **steered}


@dataclass
class Outcome:
    """What one configuration produced: responses, their IFEval scores, perplexity. Plain data, so
    that it travels between processes and through shard files."""

    responses: list[str]
    scores: dict
    perplexity: float | None
    seconds: float = 0.0


def run_configuration(model, tokenizer, steering: Steering, prompts: list[dict], texts: list[str] | None,
                      max_new_tokens: int, batch_size: int | None) -> Outcome:
    """Generate for every prompt with the configuration's steering active, score, measure perplexity."""
    started = time.time()
    with apply(model, steering):
        responses = generate_greedy(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens, batch_size,
                                    progress=True)
        ppl = perplexity(model, tokenizer, texts, batch_size=batch_size, progress=True) if texts else None
    return Outcome(responses, score_responses(prompts, responses), ppl, round(time.time() - started, 2))


def per_prompt_counts(scores: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator per prompt of an IFEval metric (prompt- or instruction-level)."""
    kind = "strict" if "strict" in metric else "loose"
    rows = scores["per_prompt"]
    if metric.startswith("prompt_level"):
        return np.array([float(r[f"follow_all_{kind}"]) for r in rows]), np.ones(len(rows))
    return np.array([float(sum(r[kind])) for r in rows]), np.array([float(len(r[kind])) for r in rows])


def entry(name: str, steering: Steering, outcome: Outcome, baseline: Outcome, metric: str, seed: int) -> dict:
    """One configuration of the results JSON: the four metrics, accuracy, Δ with paired bootstrap CI
    (over prompts) and sign test, perplexity."""
    metrics = {m: round(outcome.scores["metrics"][m], 4) for m in METRICS}
    base_counts, totals = per_prompt_counts(baseline.scores, metric)
    counts, _ = per_prompt_counts(outcome.scores, metric)
    indices = bootstrap_indices(np.zeros(len(totals)), seed=seed)
    change = compare(base_counts, counts, indices, totals=totals)
    ppl, base_ppl = outcome.perplexity, baseline.perplexity
    return {
        "name": name, "description": steering.describe(), "layer": steering.layer,
        "factor": steering.intervention.factors[0] if steering.intervention.kind == "scale" else None,
        "neurons": steering.neurons, **metrics, "accuracy": metrics[metric], **change,
        "perplexity": ppl, "perplexity_delta": None if ppl is None or base_ppl is None else ppl - base_ppl,
        "num_prompts": outcome.scores["num_prompts"], "seconds": outcome.seconds,
    }


def response_rows(outcome: Outcome) -> list[dict]:
    """responses_<name>.jsonl: what the model wrote and which instructions it followed."""
    return [{"key": r["key"], "prompt": r["prompt"], "response": r["response"], "instructions": r["instructions"],
             "strict": r["strict"], "loose": r["loose"], "follow_all_strict": r["follow_all_strict"],
             "follow_all_loose": r["follow_all_loose"]} for r in outcome.scores["per_prompt"]]


def best_configuration(entries: list[dict]) -> dict | None:
    """The most accurate configuration whose gain over the baseline has a 95% CI above 0, if any."""
    gains = [e for e in entries if e["name"] != "baseline" and e["ci95"] is not None and e["ci95"][0] > 0]
    return max(gains, key=lambda e: e["accuracy"], default=None)


def print_summary(title: str, entries: list[dict], metric: str, factor: float, factor_source: str) -> None:
    """The original study's summary table: Experiment, Configuration, Accuracy, Δ from Baseline, and
    ✓ (best) on the best configuration whose gain's 95% CI lies above 0."""
    best = best_configuration(entries)
    print(f"\n{title}  (Accuracy = {metric})")
    print(f"  {'Experiment':<18} {'Configuration':<34} {'Accuracy':>8} {'Δ from Baseline':>16} {'95% CI':>17} "
          f"{'Perplexity':>10}")
    for e in entries:
        experiment = "Baseline" if e["name"] == "baseline" else title
        delta = "" if e["name"] == "baseline" else f"{e['delta']:+.2f}"
        ci = "" if e["name"] == "baseline" else f"[{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"
        ppl = "" if e["perplexity"] is None else f"{e['perplexity']:.2f}"
        flag = "  ✓ (best)" if e is best else ""
        print(f"  {experiment:<18} {e['name']:<34} {e['accuracy']:8.2f} {delta:>16} {ci:>17} {ppl:>10}{flag}")
    if best is None:
        print("  no configuration beats the baseline (no 95% CI of the gain lies above 0)")
    if any(e["factor"] not in (None, 0) for e in entries):
        print(f"  factor x{factor:g}: {FACTOR_SOURCES.get(factor_source, factor_source)}")
