"""Metrics from scores: per-example correctness of each task's metric (acc, acc_norm, greedy), accuracy
per task and over tasks, chance, the weights of a mean over tasks, comparisons with a baseline, and
perplexity with the paired CI of its change. Plain numbers in, plain numbers out: no model."""

from __future__ import annotations

import math

import numpy as np

from ..data.tasks import Example, task_names
from .stats import bootstrap_indices, compare, percentile_interval, rounded


def choice_lengths(example: Example) -> np.ndarray:
    """The length of each choice in characters, acc_norm's normaliser."""
    return np.array([len(c) for c in example.choices], dtype=float)


# Each metric: what it compares across an example's choices, from their summed log-probs (...,
# choices); the argmax is the answer. greedy (lambada) has one request, correct when every target
# token is the argmax. Scoring's correctness and attribution's margins both read this table.
CHOICE_SCORES = {
    "acc": lambda example, logprob: logprob,
    "acc_norm": lambda example, logprob: logprob / choice_lengths(example),  # lm-eval: len(choice), characters
    "greedy": None,
}


def correctness(examples: list[Example], logprob: np.ndarray, greedy: np.ndarray) -> np.ndarray:
    """Per example: 1.0 correct, 0.0 wrong, NaN when its logits were not finite."""
    out, start = np.zeros(len(examples)), 0
    for k, example in enumerate(examples):
        n = len(example.requests)
        lls, flags = logprob[start: start + n], greedy[start: start + n]
        start += n
        if np.isnan(lls).any():
            out[k] = np.nan
        elif CHOICE_SCORES[example.metric] is None:
            out[k] = float(flags[0])
        else:
            out[k] = float(np.argmax(CHOICE_SCORES[example.metric](example, lls)) == example.label)
    return out


def summarize(examples: list[Example], correct: np.ndarray) -> dict:
    """Accuracy in percent: per task, and the mean over tasks. A task with non-finite logits has
    accuracy None (and so has the mean): those examples are broken, not wrong."""
    tasks = np.array([e.task for e in examples])
    per_task, non_finite = {}, {}
    for name in task_names(examples):
        values = correct[tasks == name]
        bad = int(np.isnan(values).sum())
        per_task[name] = None if bad else round(100.0 * float(values.mean()), 4)
        if bad:
            non_finite[name] = bad
    known = [v for v in per_task.values() if v is not None]
    accuracy = round(float(np.mean(known)), 4) if len(known) == len(per_task) else None
    return {"accuracy": accuracy, "per_task": per_task, "non_finite": non_finite}


def chance_correctness(examples: list[Example]) -> np.ndarray:
    """Each example's expected correctness under uniform guessing among its choices (0 for greedy
    generation); `summarize` turns it into chance accuracy per task and over tasks."""
    return np.array([0.0 if e.metric == "greedy" else 1.0 / len(e.choices) for e in examples])


def example_weights(examples: list[Example]) -> np.ndarray:
    """Weights that turn a per-example mean into the mean over tasks of per-task accuracy (percent)."""
    tasks = [e.task for e in examples]
    names = task_names(examples)
    counts = {t: tasks.count(t) for t in names}
    return np.array([100.0 / (len(names) * counts[t]) for t in tasks])


class Comparison:
    """Configurations compared with a baseline on the same examples: accuracy, Δ or impact, paired
    bootstrap 95% CI and sign-test p, from `stats.compare` with bootstrap resamples drawn once."""

    def __init__(self, examples: list[Example], baseline: np.ndarray, seed: int):
        self.examples, self.baseline = examples, np.asarray(baseline, dtype=float)
        self.weights = example_weights(examples)
        self.indices = bootstrap_indices(np.array([e.task for e in examples]), seed=seed)
        self.base = summarize(examples, self.baseline)

    def _entry(self, correct: np.ndarray, first: np.ndarray, second: np.ndarray, key: str, fields: dict) -> dict:
        summary = summarize(self.examples, correct)
        result = compare(first, second, self.indices, self.weights)
        entry = {**fields, "accuracy": summary["accuracy"], key: result["delta"], "per_task": summary["per_task"],
                 "ci95": result["ci95"], "p_value": result["p_value"]}
        if summary["non_finite"]:
            entry["non_finite"] = summary["non_finite"]
        return entry

    def entry(self, correct: np.ndarray, **fields) -> dict:
        """A configuration: its accuracy and Δ = accuracy - baseline (points), CI of Δ, p."""
        return self._entry(correct, self.baseline, correct, "delta", fields)

    def impact(self, correct: np.ndarray, **fields) -> dict:
        """An ablation: its accuracy and impact = baseline - accuracy (points), CI of the impact, p."""
        return self._entry(correct, correct, self.baseline, "impact", fields)


def perplexity_of(losses: dict[str, list[float]]) -> float:
    """Token-weighted perplexity of `document_losses`; NaN if any document's logits are not finite."""
    nll = np.asarray(losses["nll"], float)
    return float("nan") if np.isnan(nll).any() else math.exp(nll.sum() / sum(losses["tokens"]))


def perplexity_change(base: dict[str, list[float]], other: dict[str, list[float]], seed: int = 0,
                      level: float = 0.95) -> dict:
    """`other`'s perplexity against `base`'s on the same documents: delta = other - base, relative =
    100 * (other / base - 1) (percent), each with its percentile CI over documents resampled with
    replacement, the same resample for both (paired). Every value None when a perplexity is NaN."""
    base_nll, other_nll = np.asarray(base["nll"], float), np.asarray(other["nll"], float)
    if np.isnan(base_nll).any() or np.isnan(other_nll).any():
        return {"delta": None, "ci95": None, "relative": None, "relative_ci95": None}
    tokens = np.asarray(base["tokens"], float)
    indices = bootstrap_indices(np.zeros(len(tokens)), seed=seed)
    resampled_tokens = tokens[indices].sum(1)
    base_ppl = np.exp(base_nll[indices].sum(1) / resampled_tokens)
    other_ppl = np.exp(other_nll[indices].sum(1) / resampled_tokens)
    base_value, other_value = perplexity_of(base), perplexity_of(other)
    return {"delta": rounded(other_value - base_value, 6), "ci95": percentile_interval(other_ppl - base_ppl, level, 6),
            "relative": rounded(100 * (other_value / base_value - 1), 6),
            "relative_ci95": percentile_interval(100 * (other_ppl / base_ppl - 1), level, 6)}


def describe_change(label: str, value: float, change: dict) -> str:
    """A perplexity and its change from the baseline with CIs, in one phrase for the console."""
    if change["delta"] is None:
        return f"{label} non-finite"
    lo, hi = change["ci95"]
    noise = ", within noise" if lo <= 0 <= hi else ""
    return (f"{label} {value:.4f} (Δ {change['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}], "
            f"{change['relative']:+.3f}% [{change['relative_ci95'][0]:+.3f}%, {change['relative_ci95'][1]:+.3f}%]"
            f"{noise})")
