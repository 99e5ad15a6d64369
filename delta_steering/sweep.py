"""Single-neuron sweeps: every neuron of a list steered on its own, every example scored.

`engine="naive"` runs the whole model once per neuron through `steer`; it is the reference that
the fast engine must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scoring import Encoded, correctness, encode_examples, loglikelihoods
from .steering import steer
from .tasks import Example

ENGINES = ("fast", "naive")


@dataclass(frozen=True)
class Intervention:
    """What a sweep does to each neuron on its own: scale it by `factor` (0 = zero ablation), or
    replace it by its mean `dt_pre` (`means`, one value per delta neuron of the layer)."""

    mode: str = "scale"
    factor: float = 0.0
    means: tuple[float, ...] | None = None

    def install(self, model, layer: int, neuron: int):
        if self.mode == "mean":
            return steer(model, layer, [neuron], mode="mean", means=[self.means[neuron]])
        return steer(model, layer, [neuron], self.factor)


def _naive_loglikelihoods(model, tokenizer, encoded, layer, neurons, intervention, batch_size):
    logprob = np.empty((len(neurons), len(encoded)))
    greedy = np.empty((len(neurons), len(encoded)), dtype=bool)
    for k, neuron in enumerate(neurons):
        with intervention.install(model, layer, neuron):
            logprob[k], greedy[k] = loglikelihoods(model, tokenizer, encoded, batch_size)
    return logprob, greedy


def sweep_loglikelihoods(model, tokenizer, encoded: list[Encoded], layer: int, neurons: list[int],
                         intervention: Intervention, engine: str = "fast",
                         batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob and greedy flag of every request (columns) with each neuron steered alone (rows)."""
    if engine == "naive":
        return _naive_loglikelihoods(model, tokenizer, encoded, layer, neurons, intervention, batch_size)
    if engine == "fast":
        from .fast_sweep import fast_loglikelihoods

        return fast_loglikelihoods(model, tokenizer, encoded, layer, neurons, intervention, batch_size)
    raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")


def sweep_correctness(model, tokenizer, examples: list[Example], layer: int, neurons: list[int],
                      intervention: Intervention, engine: str = "fast", batch_size: int | None = None,
                      encoded: list[Encoded] | None = None) -> np.ndarray:
    """neurons x examples correctness (1, 0, NaN for non-finite logits) of single-neuron interventions."""
    encoded = encoded or encode_examples(tokenizer, examples)
    logprob, greedy = sweep_loglikelihoods(model, tokenizer, encoded, layer, neurons, intervention, engine,
                                           batch_size)
    return np.stack([correctness(examples, lp, g) for lp, g in zip(logprob, greedy)])
