"""Step 3: steered configurations evaluated on IFEval (greedy generation) and Pile perplexity, each
compared with the baseline on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..artifacts import Discovery, delta_sensitive
from ..data.ifeval import METRICS
from ..intervention import Intervention, Steering
from .metrics import perplexity_change
from .stats import below_detection, bootstrap_indices, compare, describe_detection_limit, detection_limit

MODES = ("combined", "cluster_ablation", "layer_ablation")
DESCRIPTION = (
    "Step 3, verification: each configuration (a neuron_set steered by `factor`, or ablated, at a layer) and the "
    "baseline on the same IFEval prompts (greedy generation) and Pile documents. IFEval metrics in percent; "
    "accuracy = the ifeval_metric; delta = accuracy - baseline (points), ci95 = paired bootstrap 95% CI of delta "
    "over prompts, p_value = exact sign test over the prompts whose score changed; perplexity = exp(mean token "
    "NLL) on the evaluation Pile documents, perplexity_delta = perplexity - baseline's with perplexity_ci95 its "
    "paired bootstrap 95% CI over documents, perplexity_relative = percent change (perplexity_relative_ci95). "
    "minimum_detectable_effect: the smallest Δ (points) these prompts detect with 80% power at alpha 0.05, from "
    "the share of prompts the configurations changed. factor_source: command-line, step2-confirmed, or "
    "step2-unconfirmed (step 2's selection-best factor, not confirmed); factor_standing says it in words.")
MODE_NAMES = {"combined": "Combined steering", "cluster_ablation": "Cluster ablation",
              "layer_ablation": "Layer ablation"}  # the original study's names (and its file names)
FACTOR_SOURCES = {  # where a steering factor came from: (a few words for figures, the console's sentence)
    "command-line": ("given with --factor", "given with --factor"),
    "step2-confirmed": ("confirmed in step 2", "step 2's High Impact factor, confirmed on its confirmation half"),
    "step2-unconfirmed": ("unconfirmed in step 2", "step 2's selection-best High Impact factor, NOT confirmed on "
                                                   "its confirmation half")}


def factor_source_text(source: str | None, short: bool = False) -> str | None:
    """A factor's source in words: a few (`short`, for figures) or the console's sentence."""
    return FACTOR_SOURCES[source][0 if short else 1] if source in FACTOR_SOURCES else source


def steering_words(factor: float) -> str:
    """What steering by `factor` does, in words: '×2 amplification', '×0.5 attenuation', 'ablation'."""
    if factor == 0:
        return "ablation"
    return f"×{factor:g} " + ("amplification" if factor > 1 else "attenuation" if factor < 1 else "(no change)")


def layer_span(layers: list[int]) -> str:
    """'layer 20', 'layers 18–22' (consecutive) or 'layers 3, 7, 9'."""
    layers = sorted(layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    consecutive = layers == list(range(layers[0], layers[-1] + 1))
    return "layers " + (f"{layers[0]}–{layers[-1]}" if consecutive else ", ".join(map(str, layers)))


def mode_title(mode: str, factor: float, layer: int, layers: list[int], ablation: str) -> str:
    """The original study's name for a mode, then what it ran."""
    what = {"combined": f"each set, {steering_words(factor)} at layer {layer}",
            "cluster_ablation": f"each set {ablation}-ablated at layer {layer}",
            "layer_ablation": f"delta-sensitive set, {steering_words(factor)} at {layer_span(layers or [layer])}"}
    return f"{MODE_NAMES[mode]}: {what[mode]}"


def factor_standing(factor: float, source: str, optimal: dict | None) -> str:
    """Which factor step 3 steers with and why, in one line: given on the command line, confirmed by
    step 2, or step 2's selection-best factor that it did not confirm (with what it did on selection)."""
    if source == "command-line":
        return f"steering factor ×{factor:g}: given on the command line (--factor)"
    if source == "step2-confirmed":
        c = (optimal or {}).get("confirmation") or {}
        shown = "" if c.get("delta") is None else f" (Δ {c['delta']:+.2f} points, sign-test p {c['p_value']:.3g})"
        return f"steering factor ×{factor:g}: step 2 confirmed it on its confirmation half{shown}"
    selection = ((optimal or {}).get("selection") or {}).get("delta")
    if optimal and optimal.get("beats_baseline"):
        c = optimal.get("confirmation") or {}
        tested = "" if c.get("delta") is None else f", then Δ {c['delta']:+.2f} on confirmation, not significant"
        return (f"step 2 did not confirm its High Impact factor: verifying the selection-best ×{factor:g} "
                f"(Δ {selection:+.2f} points on selection{tested}) — pass --factor to choose")
    how = "" if selection is None else f", which {'lost' if selection < 0 else 'changed'} " \
                                       f"{abs(selection):.1f} points on selection"
    return (f"step 2 confirmed no factor; verifying the selection-best ×{factor:g}{how} — pass --factor to "
            "choose")


@dataclass(frozen=True)
class Configuration:
    """One configuration step 3 runs: the neuron set it steers (None: the baseline), the steering,
    and whether it ablates the set (cluster ablation) rather than scaling it."""

    neuron_set: str | None
    steering: Steering
    ablated: bool = False

    @property
    def name(self) -> str:
        """The original study's name (and its files'): 'baseline', 'delta_sensitive_L20', 'ablate_random_L20'."""
        if self.neuron_set is None:
            return "baseline"
        return f"{'ablate_' if self.ablated else ''}{self.neuron_set}_L{self.steering.layer}"

    def describe(self) -> str:
        """What it runs, in words: 'delta_sensitive set, ×2 amplification at layer 20', 'random set,
        zero ablation at layer 20'."""
        if self.neuron_set is None:
            return "no steering"
        iv = self.steering.intervention
        what = "mean ablation" if iv.kind == "set" else "zero ablation" if iv.factors[0] == 0 else \
            steering_words(iv.factors[0])
        return f"{self.neuron_set} set, {what} at layer {self.steering.layer}"


BASELINE = Configuration(None, Steering())  # no steering


def neuron_sets(step1: Discovery, n_delta_neurons: int, seed: int) -> tuple[dict[str, list[int]], list[str]]:
    """Delta-sensitive (step 1's High Impact group, else its top 20), random (same size, disjoint,
    seeded) and high-variance (same size, top delta variance) sets, plus warnings to print."""
    warnings = []
    sensitive = delta_sensitive(step1.records, step1.groups)
    if not step1.groups["high_impact"]:
        warnings.append(f"step 1 found no High Impact neuron (impact > {step1.high_impact_cut:g} points); using its top "
                        f"{len(sensitive)} by impact")
    others = np.array(sorted(set(range(n_delta_neurons)) - set(sensitive)))
    rng = np.random.default_rng(seed)
    random_set = sorted(int(i) for i in rng.choice(others, size=min(len(sensitive), len(others)), replace=False))
    sets = {"delta_sensitive": sensitive, "random": random_set,
            "high_variance": sorted(step1.variance_ranking[: len(sensitive)])}
    return {k: v for k, v in sets.items() if v}, warnings


def configurations(mode: str, sets: dict[str, list[int]], layer: int, layers: list[int], factor: float,
                   ablation: str, dt_pre_mean: list[float]) -> dict[str, Configuration]:
    """The configurations a mode runs, by name, baseline first. Cluster ablation removes each set as
    step 1 removed single neurons (zero or mean ablation)."""
    if mode == "combined":
        steered = [Configuration(k, Steering(layer, Intervention.scale(v, factor))) for k, v in sets.items()]
    elif mode == "cluster_ablation":
        steered = [Configuration(k, Steering(layer, Intervention.ablation(ablation, v, dt_pre_mean)), ablated=True)
                   for k, v in sets.items()]
    elif mode == "layer_ablation":
        steered = [Configuration("delta_sensitive", Steering(at, Intervention.scale(sets["delta_sensitive"], factor)))
                   for at in layers]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {c.name: c for c in [BASELINE, *steered]}


@dataclass
class Outcome:
    """What one configuration produced: responses, their IFEval scores, perplexity. Plain data, so
    that it travels between processes and through shard files."""

    responses: list[str]
    scores: dict
    perplexity: float | None
    seconds: float = 0.0
    document_losses: dict | None = None  # per Pile document: summed NLL and tokens (perplexity.document_losses)


def per_prompt_counts(scores: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator per prompt of an IFEval metric (prompt- or instruction-level)."""
    kind = "strict" if "strict" in metric else "loose"
    rows = scores["per_prompt"]
    if metric.startswith("prompt_level"):
        return np.array([float(r[f"follow_all_{kind}"]) for r in rows]), np.ones(len(rows))
    return np.array([float(sum(r[kind])) for r in rows]), np.array([float(len(r[kind])) for r in rows])


def entry(configuration: Configuration, outcome: Outcome, baseline: Outcome, metric: str, seed: int) -> dict:
    """One configuration of the results JSON: the four metrics, accuracy, Δ with paired bootstrap CI
    (over prompts) and sign test, perplexity."""
    metrics = {m: round(outcome.scores["metrics"][m], 4) for m in METRICS}
    base_counts, totals = per_prompt_counts(baseline.scores, metric)
    counts, _ = per_prompt_counts(outcome.scores, metric)
    indices = bootstrap_indices(np.zeros(len(totals)), seed=seed)
    change = compare(base_counts, counts, indices, totals=totals)
    steering, ppl, base_ppl = configuration.steering, outcome.perplexity, baseline.perplexity
    ppl_change = (perplexity_change(baseline.document_losses, outcome.document_losses, seed)
                  if outcome.document_losses and baseline.document_losses else {})
    return {
        "name": configuration.name, "description": configuration.describe(), "neuron_set": configuration.neuron_set,
        "ablated": configuration.ablated, "layer": steering.layer,
        "factor": steering.intervention.factors[0] if steering.intervention.kind == "scale" else None,
        "neurons": steering.neurons, **metrics, "accuracy": metrics[metric], **change,
        "perplexity": ppl, "perplexity_delta": None if ppl is None or base_ppl is None else ppl - base_ppl,
        "perplexity_ci95": ppl_change.get("ci95"), "perplexity_relative": ppl_change.get("relative"),
        "perplexity_relative_ci95": ppl_change.get("relative_ci95"),
        "num_prompts": outcome.scores["num_prompts"], "seconds": outcome.seconds,
    }


def prompt_limit(outcomes: list[Outcome], baseline: Outcome, metric: str) -> dict:
    """The minimum detectable effect of these prompts: the share of them whose score (of `metric`)
    the configurations changed. An instruction-level metric weighs a prompt by its instructions and
    counts a changed prompt as all of them changing (so its figure errs on the large side)."""
    base, totals = per_prompt_counts(baseline.scores, metric)
    rows = [per_prompt_counts(o.scores, metric)[0] for o in outcomes]
    return detection_limit(base / totals, [row / totals for row in rows], 100 * totals / totals.sum(),
                           "a configuration vs the baseline on the same prompts")


def response_rows(outcome: Outcome) -> list[dict]:
    """responses_<name>.jsonl: what the model wrote and which instructions it followed."""
    return [{"key": r["key"], "prompt": r["prompt"], "response": r["response"], "instructions": r["instructions"],
             "strict": r["strict"], "loose": r["loose"], "follow_all_strict": r["follow_all_strict"],
             "follow_all_loose": r["follow_all_loose"]} for r in outcome.scores["per_prompt"]]


def best_configuration(entries: list[dict]) -> dict | None:
    """The most accurate configuration whose gain over the baseline has a 95% CI above 0, if any."""
    gains = [e for e in entries if e["name"] != "baseline" and e["ci95"] is not None and e["ci95"][0] > 0]
    return max(gains, key=lambda e: e["accuracy"], default=None)


def print_summary(title: str, entries: list[dict], metric: str, factor: float, factor_source: str,
                  limit: dict | None = None) -> None:
    """The original study's summary table: Experiment (its mode names), Configuration, Accuracy, Δ
    from Baseline, and ✓ (best) on the best configuration whose gain's 95% CI lies above 0; `title`
    says what the mode ran. Each Δ below the minimum detectable effect `limit` is marked."""
    best = best_configuration(entries)
    experiment_name = title.split(":")[0]
    print(f"\n{title}  (Accuracy = {metric})")
    print(f"  {'Experiment':<18} {'Configuration':<34} {'Accuracy':>8} {'Δ from Baseline':>16} {'95% CI':>17} "
          f"{'Perplexity (Δ %, 95% CI)':>34}")
    for e in entries:
        experiment = "Baseline" if e["name"] == "baseline" else experiment_name
        delta = "" if e["name"] == "baseline" else f"{e['delta']:+.2f}" + ("*" if limit and below_detection(
            e["delta"], limit) else " ")
        ci = "" if e["name"] == "baseline" else f"[{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"
        flag = "  ✓ (best)" if e is best else ""
        print(f"  {experiment:<18} {e['name']:<34} {e['accuracy']:8.2f} {delta:>16} {ci:>17} "
              f"{perplexity_cell(e):>34}{flag}")
    if best is None:
        print("  no configuration beats the baseline (no 95% CI of the gain lies above 0)")
    if limit:
        below = [e for e in entries if e["name"] != "baseline" and below_detection(e["delta"], limit)]
        print("  " + describe_detection_limit(limit)
              + (f"\n  * {len(below)} of {len(entries) - 1} Δ are below it: this run could not have told them "
                 "from no effect" if below else ""))
    if any(e["factor"] not in (None, 0) for e in entries):
        print(f"  factor ×{factor:g}: {factor_source_text(factor_source)}")


def perplexity_cell(e: dict) -> str:
    """A configuration's perplexity, and for a steered one its percent change with the 95% CI."""
    if e["perplexity"] is None:
        return ""
    if e["name"] == "baseline" or e.get("perplexity_relative") is None:
        return f"{e['perplexity']:.3f}"
    lo, hi = e["perplexity_relative_ci95"]
    return f"{e['perplexity']:.3f} ({e['perplexity_relative']:+.3f}% [{lo:+.3f}, {hi:+.3f}])"
