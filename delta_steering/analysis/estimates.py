"""What attribution's gradients say about accuracy: correctness and margins predicted from linearised
scores, and each neuron's estimated impact. Plain arrays in and out (the gradients themselves are
`engine.attribution`'s)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.tasks import Example
from .metrics import CHOICE_SCORES, correctness, example_weights


@dataclass
class Attribution:
    """First-order estimates for every delta neuron of a layer.

    Each request has a differentiable *score*: its summed target log-prob ("logprob", for acc and
    acc_norm examples), or for greedy examples (lambada) its greedy margin ("margin"): the smallest,
    over its target tokens, of logit(target) - max logit(other token), positive iff all are greedy.
    `base` is each request's score without intervention and `delta[i, r]` the estimated change of
    request r's score when neuron i alone is intervened on."""

    base: np.ndarray  # (requests,)
    delta: np.ndarray  # (delta neurons, requests)
    kinds: tuple[str, ...]  # "logprob" or "margin", per request


def estimated_correctness(examples: list[Example], att: Attribution) -> np.ndarray:
    """(delta neurons, examples): correctness predicted from the linearised scores base + delta,
    with the task's metric (argmax of log-prob, of log-prob per character, or greedy margin > 0)."""
    greedy_request = np.array([k == "margin" for k in att.kinds])
    scores = att.base[None, :] + att.delta
    return np.stack([correctness(examples, row, (row > 0) & greedy_request) for row in scores])


def example_margins(examples: list[Example], scores: np.ndarray) -> np.ndarray:
    """Per example, how far it is from flipping: score of the label minus the best other choice
    (per character for acc_norm), or the greedy margin. Positive iff correct. scores: (..., requests)."""
    out, start = [], 0
    for example in examples:
        n = len(example.requests)
        values = scores[..., start: start + n]
        start += n
        if CHOICE_SCORES[example.metric] is None:  # greedy: the one request's margin
            out.append(values[..., 0])
            continue
        values = CHOICE_SCORES[example.metric](example, values)
        others = np.delete(values, example.label, axis=-1)
        best = others.max(-1) if others.shape[-1] else np.full(values.shape[:-1], -np.inf)
        out.append(values[..., example.label] - best)
    return np.stack(out, axis=-1)


def estimated_impacts(examples: list[Example], att: Attribution) -> tuple[np.ndarray, np.ndarray]:
    """Per delta neuron, two first-order estimates of what its ablation does to accuracy:

    - accuracy impact in points (baseline - predicted accuracy, mean over tasks as step 1 reports
      it), from the correctness predicted by the linearised scores; most neurons flip nothing, so
      it is coarse;
    - margin loss: the same task-weighted mean of (base margin - linearised margin) per example, a
      continuous score for ranking neurons whose estimated impact ties (positive = ablation hurts).
    """
    weights = example_weights(examples)
    base_correct = correctness(examples, att.base, (att.base > 0) & np.array([k == "margin" for k in att.kinds]))
    impact = (base_correct[None, :] - estimated_correctness(examples, att)) @ weights
    margins = example_margins(examples, att.base[None, :] + att.delta)
    margin_loss = (example_margins(examples, att.base)[None, :] - margins) @ weights / 100.0
    return impact, margin_loss
