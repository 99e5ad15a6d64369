"""Step 3: steered configurations evaluated on IFEval (greedy generation) and Pile perplexity,
each compared with the baseline on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generation import generate_greedy
from .ifeval import METRICS, score_responses
from .perplexity import perplexity
from .stats import BOOTSTRAP_RESAMPLES
from .steering import steer


@dataclass(frozen=True)
class Configuration:
    """A named intervention: `neurons` of `layer` multiplied by `factor` (none for the baseline)."""

    name: str
    layer: int | None = None
    neurons: tuple[int, ...] = ()
    factor: float = 1.0
    description: str = ""

    def install(self, model):
        return steer(model, self.layer, list(self.neurons), self.factor) if self.neurons else _NoSteering()


class _NoSteering:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


BASELINE = Configuration("baseline", description="no steering")


def neuron_sets(step1: dict, n_delta_neurons: int, seed: int) -> tuple[dict[str, list[int]], list[str]]:
    """Delta-sensitive (step 1's High Impact, else its top 20), random (same size, disjoint, seeded) and
    high-variance (same size, top delta variance) sets, plus warnings to print."""
    from .discovery import impact_groups

    warnings = []
    sensitive = impact_groups(step1)["high_impact"]
    if not sensitive:
        ranked = [r for r in step1["all_neuron_impacts"] if r["impact"] is not None]
        sensitive = sorted(r["neuron"] for r in ranked[:20])
        warnings.append(f"step 1 found no High Impact neuron (impact > 2); using its top {len(sensitive)} by impact")
    others = np.array(sorted(set(range(n_delta_neurons)) - set(sensitive)))
    rng = np.random.default_rng(seed)
    random_set = sorted(int(i) for i in rng.choice(others, size=min(len(sensitive), len(others)), replace=False))
    variance_rank = step1.get("high_variance_neurons") or []
    if not variance_rank:
        warnings.append("step-1 file has no high_variance_neurons: the high-variance set is skipped")
    sets = {"delta_sensitive": sensitive, "random": random_set, "high_variance": sorted(variance_rank[: len(sensitive)])}
    return {k: v for k, v in sets.items() if v}, warnings


def configurations(mode: str, sets: dict[str, list[int]], layer: int, layers: list[int], factor: float) -> list[Configuration]:
    """The configurations a mode runs, baseline first."""
    if mode == "combined":
        return [BASELINE] + [Configuration(f"{k}_L{layer}", layer, tuple(v), factor, f"{k} x{factor:g} at layer {layer}")
                             for k, v in sets.items()]
    if mode == "cluster_ablation":
        return [BASELINE] + [Configuration(f"ablate_{k}_L{layer}", layer, tuple(v), 0.0, f"{k} ablated at layer {layer}")
                             for k, v in sets.items()]
    if mode == "layer_ablation":
        sensitive = tuple(sets["delta_sensitive"])
        return [BASELINE] + [Configuration(f"delta_sensitive_L{l}", l, sensitive, factor,
                                           f"delta_sensitive x{factor:g} at layer {l}") for l in layers]
    raise ValueError(f"unknown mode {mode!r}")


@dataclass
class Outcome:
    """What one configuration produced: responses, their IFEval scores, perplexity. Plain data, so
    that it travels between processes and through shard files."""

    responses: list[str]
    scores: dict
    perplexity: float | None
    seconds: float = 0.0


def run_configuration(model, tokenizer, configuration: Configuration, prompts: list[dict], texts: list[str] | None,
                      max_new_tokens: int, batch_size: int | None) -> Outcome:
    """Generate for every prompt with the configuration's steering active, score, measure perplexity."""
    import time

    started = time.time()
    with configuration.install(model):
        responses = generate_greedy(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens, batch_size,
                                    progress=True)
        ppl = perplexity(model, tokenizer, texts, batch_size=batch_size) if texts else None
    return Outcome(responses, score_responses(prompts, responses), ppl, round(time.time() - started, 2))


def _per_prompt_counts(scores: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator per prompt of an IFEval metric (prompt- or instruction-level)."""
    kind = "strict" if "strict" in metric else "loose"
    rows = scores["per_prompt"]
    if metric.startswith("prompt_level"):
        return np.array([float(r[f"follow_all_{kind}"]) for r in rows]), np.ones(len(rows))
    return np.array([float(sum(r[kind])) for r in rows]), np.array([float(len(r[kind])) for r in rows])


def ifeval_delta_ci(base: dict, other: dict, metric: str, seed: int, level: float = 0.95) -> list[float]:
    """Paired bootstrap (over prompts) CI of the change of an IFEval metric, in points."""
    b_num, den = _per_prompt_counts(base, metric)
    o_num, _ = _per_prompt_counts(other, metric)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(den), size=(BOOTSTRAP_RESAMPLES, len(den)))
    totals = den[idx].sum(1)
    diffs = 100.0 * (o_num[idx].sum(1) - b_num[idx].sum(1)) / totals
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return [round(float(lo), 4), round(float(hi), 4)]


def entry(c: Configuration, outcome: Outcome, baseline: Outcome, metric: str, seed: int) -> dict:
    """One configuration of the results JSON: the four metrics, accuracy, delta with CI, perplexity."""
    metrics = {m: round(outcome.scores["metrics"][m], 4) for m in METRICS}
    accuracy, base_accuracy = metrics[metric], round(baseline.scores["metrics"][metric], 4)
    ppl, base_ppl = outcome.perplexity, baseline.perplexity
    return {
        "name": c.name, "description": c.description, "layer": c.layer, "factor": c.factor if c.neurons else None,
        "neurons": list(c.neurons), **metrics, "accuracy": accuracy, "delta": round(accuracy - base_accuracy, 4),
        "ci95": ifeval_delta_ci(baseline.scores, outcome.scores, metric, seed),
        "perplexity": ppl, "perplexity_delta": None if ppl is None or base_ppl is None else ppl - base_ppl,
        "num_prompts": outcome.scores["num_prompts"], "seconds": outcome.seconds,
    }


def response_rows(outcome: Outcome) -> list[dict]:
    """responses_<name>.jsonl: what the model wrote and which instructions it followed."""
    return [{"key": r["key"], "prompt": r["prompt"], "response": r["response"], "instructions": r["instructions"],
             "strict": r["strict"], "loose": r["loose"], "follow_all_strict": r["follow_all_strict"],
             "follow_all_loose": r["follow_all_loose"]} for r in outcome.scores["per_prompt"]]


FACTOR_SOURCES = {"command-line": "given with --factor",
                  "step2-confirmed": "step 2's High Impact factor, confirmed on its confirmation half",
                  "step2-unconfirmed": "step 2's selection-best High Impact factor, NOT confirmed on its "
                                       "confirmation half"}


def best_configuration(entries: list[dict]) -> dict | None:
    """The most accurate configuration whose gain over the baseline has a 95% CI above 0, if any."""
    gains = [e for e in entries if e["name"] != "baseline" and e["ci95"] is not None and e["ci95"][0] > 0]
    return max(gains, key=lambda e: e["accuracy"], default=None)


def print_summary(title: str, entries: list[dict], metric: str, factor: float, factor_source: str) -> None:
    """The original study's summary table: Experiment, Configuration, Accuracy, Δ from Baseline, and
    ✓ (best) on the best configuration whose gain's 95% CI lies above 0."""
    best = best_configuration(entries)
    print(f"\n{title}  (Accuracy = {metric})")
    print(f"  {'Experiment':<16} {'Configuration':<34} {'Accuracy':>8} {'Δ from Baseline':>16} {'95% CI':>17} "
          f"{'Perplexity':>10}")
    for e in entries:
        experiment = "Baseline" if e["name"] == "baseline" else title
        delta = "" if e["name"] == "baseline" else f"{e['delta']:+.2f}"
        ci = "" if e["name"] == "baseline" else f"[{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"
        ppl = "" if e["perplexity"] is None else f"{e['perplexity']:.2f}"
        flag = "  ✓ (best)" if e is best else ""
        print(f"  {experiment:<16} {e['name']:<34} {e['accuracy']:8.2f} {delta:>16} {ci:>17} {ppl:>10}{flag}")
    if best is None:
        print("  no configuration beats the baseline (no 95% CI of the gain lies above 0)")
    if any(e["neurons"] and e["factor"] != 0 for e in entries):
        print(f"  factor x{factor:g}: {FACTOR_SOURCES.get(factor_source, factor_source)}")
