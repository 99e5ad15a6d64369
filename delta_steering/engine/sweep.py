"""Single-neuron sweeps: every neuron of an intervention applied on its own, every example scored.

`naive` runs the whole model once per neuron through `steer`: the reference. `fast` (fast_sweep)
computes the same numbers from a shared prefix and a low-rank correction per neuron.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Callable

import numpy as np

from ..analysis.impacts import neuron_chunks
from ..analysis.metrics import correctness
from ..data.tasks import Example
from ..intervention import Intervention
from ..model.sites import family_of
from ..model.steering import install
from ..progress import tqdm
from .batching import Encoded
from .fast_sweep import FAMILIES as FAST_FAMILIES, covers, fast_loglikelihoods, fast_loglikelihoods_layers
from .scoring import encode_examples, loglikelihoods


def naive_loglikelihoods(model, tokenizer, encoded: list[Encoded], layer: int, intervention: Intervention,
                         batch_size: int | None = None, progress: bool = False,
                         share_contexts: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reference: for each neuron, install its intervention and score every request
    (`share_contexts=False`: every request read whole, as lm-eval and the original study do)."""
    logprob = np.empty((len(intervention.neurons), len(encoded)))
    greedy = np.empty((len(intervention.neurons), len(encoded)), dtype=bool)
    for k, neuron in enumerate(tqdm(intervention.neurons, desc="naive sweep", unit="neuron", disable=not progress,
                                    leave=False)):
        with install(model, layer, intervention.only([neuron])):
            logprob[k], greedy[k] = loglikelihoods(model, tokenizer, encoded, batch_size, share_contexts=share_contexts)
    return logprob, greedy


LOGLIKELIHOODS = {"fast": fast_loglikelihoods, "naive": naive_loglikelihoods}  # one per options.ENGINES


def engine_for(model, engine: str) -> str:
    """The engine a run uses: the one asked for, or the naive one (saying so once) where the fast
    engine does not cover the model's family."""
    if engine == "fast" and not covers(model):
        print(f"note: the fast engine covers {', '.join(FAST_FAMILIES)} models; this {family_of(model).name} model "
              "runs the naive engine (the same results, the whole model per neuron)")
        return "naive"
    return engine


def sweep_loglikelihoods(model, tokenizer, encoded: list[Encoded], layer: int, intervention: Intervention,
                         engine: str = "fast", batch_size: int | None = None,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob and greedy flag of every request (columns) with each neuron of `intervention` applied
    alone (rows, in the intervention's order); `progress` shows a bar that moves every batch."""
    if engine not in LOGLIKELIHOODS:
        raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(LOGLIKELIHOODS)}")
    return LOGLIKELIHOODS[engine](model, tokenizer, encoded, layer, intervention, batch_size=batch_size, progress=progress)


def sweep_correctness(model, tokenizer, examples: list[Example], layer: int, intervention: Intervention,
                      engine: str = "fast", batch_size: int | None = None, encoded: list[Encoded] | None = None,
                      progress: bool = False) -> np.ndarray:
    """neurons x examples correctness (1, 0, NaN for non-finite logits) of single-neuron interventions."""
    encoded = encoded or encode_examples(tokenizer, examples)
    logprob, greedy = sweep_loglikelihoods(model, tokenizer, encoded, layer, intervention, engine, batch_size,
                                           progress)
    return np.stack([correctness(examples, lp, g) for lp, g in zip(logprob, greedy)])


def sweep_correctness_layers(model, tokenizer, examples: list[Example], interventions: dict[int, Intervention],
                             engine: str = "fast", batch_size: int | None = None,
                             encoded: list[Encoded] | None = None, progress: bool = False) -> dict[int, np.ndarray]:
    """`sweep_correctness` at several layers, {layer: neurons x examples}; the fast engine runs each
    example batch's prefix once for all of them (`fast_sweep.fast_loglikelihoods_layers`)."""
    encoded = encoded or encode_examples(tokenizer, examples)
    if engine == "fast":
        scores = fast_loglikelihoods_layers(model, tokenizer, encoded, interventions, batch_size, progress)
    else:
        scores = {layer: sweep_loglikelihoods(model, tokenizer, encoded, layer, intervention, engine, batch_size,
                                              progress) for layer, intervention in interventions.items()}
    return {layer: np.stack([correctness(examples, lp, g) for lp, g in zip(*scores[layer])]) for layer in scores}


def spread(encoded: list[Encoded], count: int, runs: int = 8) -> list[Encoded]:
    """About `count` requests in `runs` runs of consecutive ones spread over the list (a context's
    requests stay together, as the engines group them)."""
    width = max(1, count // runs)
    stride = max(width, len(encoded) // runs)
    return [e for start in range(0, len(encoded), stride) for e in encoded[start: start + width]][:count]


def projected_sweep_seconds(model, tokenizer, encoded: list[Encoded], layer: int, intervention: Intervention,
                            engine: str, chunk_neurons: int, batch_size: int | None = None,
                            pilot_requests: int = 96, pilot_neurons: int = 4) -> float:
    """Seconds that sweeping every neuron of `intervention` would take, as step 1 runs it (one sweep
    per chunk of `chunk_neurons`), projected from two pilots of `pilot_neurons` neurons, on about
    `pilot_requests` requests and on twice as many (`spread`), after a warm-up. Their difference
    gives what grows with the requests' tokens, per neuron and per sweep (the fast engine reports its
    shared prefix apart); the rest of the larger pilot is what a sweep pays whatever its size."""
    pilots = [spread(encoded, pilot_requests), spread(encoded, 2 * pilot_requests)]
    tokens = [sum(len(e.tokens) for e in pilot) for pilot in pilots]
    sample = intervention.only(intervention.neurons[:pilot_neurons])
    sweep_loglikelihoods(model, tokenizer, pilots[0], layer, sample.only(sample.neurons[:1]), engine, batch_size)
    measured = []  # per pilot: (seconds in all, of them per neuron)
    for pilot in pilots:
        start, parts = time.perf_counter(), {}
        if engine == "fast":
            fast_loglikelihoods(model, tokenizer, pilot, layer, sample, batch_size, timings=parts)
        else:  # the naive engine: all its work is per neuron
            sweep_loglikelihoods(model, tokenizer, pilot, layer, sample, engine, batch_size)
        total = time.perf_counter() - start
        measured.append((total, parts.get("neurons_s", total) / len(sample.neurons)))
    extra = max(tokens[1] - tokens[0], 1)
    # per token: each neuron's work, and the rest of a sweep; noise that makes either shrink counts it all
    per_neuron = max(measured[1][1] - measured[0][1], 0.0) / extra or measured[1][1] / tokens[1]
    rest = [total - each * len(sample.neurons) for total, each in measured]
    per_sweep = max(rest[1] - rest[0], 0.0) / extra or rest[1] / tokens[1]
    fixed = max(rest[1] - per_sweep * tokens[1], 0.0)
    total_tokens = sum(len(e.tokens) for e in encoded)
    return (math.ceil(len(intervention.neurons) / chunk_neurons) * (fixed + per_sweep * total_tokens)
            + len(intervention.neurons) * per_neuron * total_tokens)


def layer_sweeps(model, tokenizer, examples: list[Example], neurons: dict[int, list[int]],
                 interventions: dict[int, Intervention], chunk_neurons: int, engine: str = "fast",
                 batch_size: int | None = None, encoded: list[Encoded] | None = None,
                 progress: bool = True) -> dict[str, Callable[[], list[dict]]]:
    """Work items that apply each of `neurons[layer]` alone (its part of `interventions[layer]`):
    item k takes chunk k (`neuron_chunks` of `chunk_neurons`) of every layer's list, all those
    layers in one sweep, so that an example batch's prefix serves them all; each item returns
    [{"layer", "neuron", "correct"}]. The items depend on the neuron lists alone (resume, shards)."""
    chunks = {layer: neuron_chunks(listed, chunk_neurons) for layer, listed in neurons.items()}

    def sweep(k: int) -> list[dict]:
        taken = {layer: c[k] for layer, c in chunks.items() if k < len(c)}
        rows = sweep_correctness_layers(model, tokenizer, examples, {layer: interventions[layer].only(chunk)
                                                                      for layer, chunk in taken.items()},
                                        engine, batch_size, encoded, progress)
        return [{"layer": layer, "neuron": n, "correct": row.tolist()}
                for layer, chunk in taken.items() for n, row in zip(chunk, rows[layer])]

    return {f"neurons/chunk{k}": partial(sweep, k) for k in range(max(map(len, chunks.values()), default=0))}
