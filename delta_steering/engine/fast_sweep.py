"""The fast exact single-neuron sweep: every neuron of an intervention applied on its own, every
request scored, from one shared prefix per example batch and a low-rank correction per neuron.

Why it is exact, not an approximation (Mamba-1; Mamba-2 below): intervening on delta neuron i of
layer L changes only `dt_pre[..., i]`, so only channel i of layer L's selective scan (the scan's
channels are independent; B and C come from `x_proj`, upstream of `dt_proj`). Layer L's output
therefore changes by a rank-1 term, `out_L' = out_L + W_out[:, i] * (y_i' - y_i)`, with y the gated
scan output. Per batch of examples the engine

1. runs the embeddings, blocks 0..L-1 and block L once (the prefix, shared by every neuron);
2. recomputes channel i's scan with the new `dt_pre_i` (an N-dimensional state: cheap), for many
   neurons and examples at once;
3. stacks the corrected layer-L outputs of (neuron, example) pairs along the batch dimension and runs
   the real blocks L+1..end, `norm_f`, and the LM head at the scored positions only.

A neuron then costs layers L+1..end (3 of 24 at mamba-130m's default layer 20) instead of the whole
model. Two more exact savings: requests that share their context (the choices of a multiple-choice
example) can run it once per neuron, each continuation read as one block from the cached state
(`continuation`; per shape of group where that was measured faster, `reading`), and the LM head runs
on many chunks' scored positions at once. Results equal the naive engine's up to float rounding
(~1e-6 relative).

Mamba-2 (`model.mamba2`): a neuron is a head, which changes only its own head_dim channels of the scan, but
the gated RMSNorm before `out_proj` rescales the rest of the head's group by a per-token factor, so
the correction is a group term plus a head term (exact algebra, see `model.mamba2`). Contexts can be shared
where a continuation from a cached context is exact (`continuation.continues_exactly`: float32).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..intervention import Intervention
from ..model import mamba2
from ..model.continuation import blocks_from, continuation_hidden, continues_exactly
from ..model.mamba1 import LayerState, blocks, gated_scan, layer_state
from ..model.mamba2 import short_chunks
from ..model.placement import input_device, weight
from ..model.sites import SSM_ONLY_FAMILIES, OutputHead, check_layer, check_neurons, decoder_layers, family_of
from ..progress import tqdm
from .batching import Encoded, batches, context_groups, gather_targets, head_rows, pad_batch, token_budget
from .reading import choice_for, shape_of
from .scoring import target_scores

FAMILIES = SSM_ONLY_FAMILIES  # every block a norm, an SSM mixer (written out: model.mamba1/2) and a residual


def covers(model) -> bool:
    """Whether the fast engine is exact for this model's family (its layer-L correction is written
    out, model.mamba1 or model.mamba2, and the blocks after layer L are plain SSM blocks); the hybrids, whose later
    blocks include attention, run the naive engine."""
    return family_of(model).name in FAMILIES


def steered_outputs(model, layer: int, state: LayerState, intervention: Intervention) -> Tensor:
    """Block L's output with each neuron steered alone: the rank-1 correction
    out_L + W_out[:, i] * (y_i' - y_i), stacked (neurons * batch, tokens, hidden), neuron-major.
    Both scans run through the same code, so the difference has no offset from summation order."""
    mixer = decoder_layers(model)[layer].mixer
    rows = torch.tensor(intervention.neurons, device=state.x.device)
    lin = state.dt_lin[:, rows].transpose(0, 1)  # (neurons, batch, tokens)
    before, after = intervention.dt_pre(lin, weight(mixer.dt_proj, "bias").detach()[rows])
    x = state.x[:, rows].transpose(0, 1)  # (neurons, batch, tokens)
    gate = state.gate[:, rows].transpose(0, 1)
    A = -torch.exp(weight(mixer, "A_log").detach()[rows].float())[:, None, :]  # (neurons, 1, state)
    D = weight(mixer, "D").detach()[rows][:, None]
    y = gated_scan(x, torch.stack([before, after]), A, state.B[None, :, :, :], state.C[None, :, :, :], D, gate)
    change = y[1] - y[0]
    columns = weight(mixer.out_proj, "weight").detach()[:, rows].T.float()  # (neurons, hidden)
    hidden = state.output.float()[None] + change[..., None] * columns[:, None, None, :]
    return hidden.to(state.output.dtype).flatten(0, 1)


def layer_pieces(model):
    """The family's (layer_state, steered_outputs): block L's state on an example batch, and its
    output with each neuron steered alone (Mamba-1 here, Mamba-2 in model.mamba2)."""
    if family_of(model).kind == "mamba2":
        return mamba2.layer_state, mamba2.steered_outputs
    return layer_state, steered_outputs


class TargetScorer:
    """Collects final hidden states at scored positions and applies the LM head to many chunks at
    once (one large matmul is about twice as fast per row on CPU as many small ones), writing each
    pair's summed log-prob and greedy flag into the sweep's arrays."""

    def __init__(self, head: OutputHead, logprob: np.ndarray, greedy: np.ndarray, max_rows: int):
        self.head, self.logprob, self.greedy, self.max_rows = head, logprob, greedy, max_rows
        self.pending: list[tuple[Tensor, list[Encoded], np.ndarray, np.ndarray]] = []
        self.rows = 0

    def add(self, compact: Tensor, items: list[Encoded], neuron_rows, request_cols) -> None:
        """compact: (pairs, max targets, hidden), target k of pair p at [p, k]."""
        self.pending.append((compact, items, np.asarray(neuron_rows), np.asarray(request_cols)))
        self.rows += sum(e.n_target for e in items)
        if self.rows >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        width = max(c.shape[1] for c, *_ in self.pending)
        compact = torch.cat([F.pad(c, (0, 0, 0, width - c.shape[1])) for c, *_ in self.pending])
        items = [e for _, chunk, *_ in self.pending for e in chunk]
        values, flags = target_scores(self.head, compact, items)
        rows = np.concatenate([r for *_, r, _ in self.pending])
        cols = np.concatenate([c for *_, c in self.pending])
        self.logprob[rows, cols], self.greedy[rows, cols] = values, flags
        self.pending, self.rows = [], 0


class FastSweep:
    """One sweep: every neuron of `intervention` applied alone at `layer`, on example batches.
    `share_contexts`: read a context group's context once per neuron (True), every request whole
    (False), or per shape of group the way measured faster (None, `reading`)."""

    def __init__(self, model, layer: int, intervention: Intervention, batch_size: int | None,
                 scorer: TargetScorer, share_contexts: bool | None, bar):
        self.model, self.layer, self.intervention = model, layer, intervention
        self.batch_size, self.scorer, self.share_contexts, self.bar = batch_size, scorer, share_contexts, bar
        self.layer_state, self.steered_outputs = layer_pieces(model)
        self.choice = choice_for(model, "fast sweep")

    def neurons_per_chunk(self, sequences: int, tokens: int) -> int:
        """How many neurons share one suffix forward, each reading `sequences` sequences of `tokens`
        tokens in all: the user's batch size in sequences, or else the memory budget of one forward."""
        if self.batch_size:
            return max(1, self.batch_size // sequences)
        return max(1, token_budget(self.model, tokens) // tokens)

    def shared(self, items: list[Encoded], group: list[int]) -> bool | None:
        """Whether a group of several requests reads its context once: as asked, or as measured for
        its shape (None: not measured yet)."""
        if self.share_contexts is None:
            return self.choice.shared.get(shape_of(items, group))
        return self.share_contexts

    def step(self, items: list[Encoded], lengths: list[int], members: list[int], shared: bool | None) -> int:
        """Neurons per chunk for some members read whole or (shared) their context once."""
        if shared:
            tokens = items[members[0]].context_length + len(members) * max(items[i].n_target - 1 for i in members)
        else:
            tokens = len(members) * max(lengths[i] for i in members)
        return self.neurons_per_chunk(len(members), tokens)

    def shared_hidden(self, steered: Tensor, items: list[Encoded]) -> Tensor:
        """Final hidden states at the scored positions of one group's (neuron, member) pairs, compact
        and neuron-major: the shared context read once per neuron from block L's steered output
        (neurons x members x tokens x hidden), each member's continuation as a block from its state."""
        n_neurons, n_members = steered.shape[:2]
        context = items[0].context_length  # input positions 0..context-1 are shared
        tail = max(e.n_target for e in items) - 1  # the inputs after the context
        owners = [n for n in range(n_neurons) for _ in range(n_members)]
        return continuation_hidden(self.model, self.layer + 1, [steered[:, 0, :context]],
                                   steered[:, :, context: context + tail].flatten(0, 1), owners)

    def whole_hidden(self, steered: Tensor, items: list[Encoded], lengths: list[int]) -> Tensor:
        """The same, every (neuron, member) pair read whole from block L's steered output
        (neurons x members x tokens x hidden)."""
        n_neurons = steered.shape[0]
        hidden = blocks_from(self.model, self.layer + 1, steered[:, :, :max(lengths)].flatten(0, 1))
        return gather_targets(hidden, items * n_neurons, lengths * n_neurons)

    def batch(self, state: LayerState, items: list[Encoded], lengths: list[int], columns: list[int],
              groups: list[list[int]]) -> None:
        """Every neuron on one example batch; groups index into `items`, columns[i] is item i's request.
        The requests alone in their group run together, then each group of several; a group of a shape
        not measured yet is read both ways on its first chunk of neurons (`reading`)."""
        neurons = self.intervention.neurons
        singles = [g[0] for g in groups if len(g) == 1]
        jobs = [(singles, False)] if singles else []
        jobs += [(g, True) for g in groups if len(g) > 1]
        for members, grouped in jobs:
            sub, sub_items, sub_lengths = state.rows(members), [items[i] for i in members], [lengths[i] for i in members]
            first = 0
            while first < len(neurons):
                shared = self.shared(items, members) if grouped else False
                chunk = neurons[first: first + self.step(items, lengths, members, shared)]
                steered = self.steered_outputs(self.model, self.layer, sub, self.intervention.only(chunk))
                steered = steered.view(len(chunk), len(members), *steered.shape[1:])
                if shared is None:
                    compact = self.choice.race(shape_of(items, members),
                                               lambda: self.shared_hidden(steered, sub_items),
                                               lambda: self.whole_hidden(steered, sub_items, sub_lengths))
                elif shared:
                    compact = self.shared_hidden(steered, sub_items)
                else:
                    compact = self.whole_hidden(steered, sub_items, sub_lengths)
                neuron_rows = np.repeat(np.arange(first, first + len(chunk)), len(members))
                request_cols = np.tile([columns[i] for i in members], len(chunk))
                self.scorer.add(compact, sub_items * len(chunk), neuron_rows, request_cols)
                self.bar.update(len(chunk) * len(members))
                first += len(chunk)



def run(sweeps: list[FastSweep], tokenizer, encoded: list[Encoded], packed: list[list[list[int]]],
        timings: dict) -> None:
    """Every example batch (`packed`: batches of groups of request indices): the blocks from the
    embeddings up, each sweep's layer state taken on the way (one prefix for every layer, lowest
    first), then every neuron of each layer; seconds added to `timings`."""
    model = sweeps[0].model
    device = input_device(model)
    for batch_groups in packed:
        columns = [i for g in batch_groups for i in g]
        items = [encoded[i] for i in columns]
        local, at = [], 0
        for g in batch_groups:
            local.append(list(range(at, at + len(g))))
            at += len(g)
        start = time.perf_counter()
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        hidden, reached = model.backbone.embeddings(ids), 0
        timings["prefix_s"] += time.perf_counter() - start
        for sweep in sweeps:
            start = time.perf_counter()
            state = sweep.layer_state(model, blocks(model, hidden, reached, sweep.layer), sweep.layer)
            hidden, reached = state.output, sweep.layer + 1
            timings["prefix_s"] += time.perf_counter() - start
            start = time.perf_counter()
            sweep.batch(state, items, lengths, columns, local)
            sweep.scorer.flush()
            timings["neurons_s"] += time.perf_counter() - start


@torch.no_grad()
def fast_loglikelihoods(model, tokenizer, encoded: list[Encoded], layer: int, intervention: Intervention,
                        batch_size: int | None = None, progress: bool = False, timings: dict | None = None,
                        share_contexts: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob (NaN where logits are not finite) and all-greedy flag of every request
    (columns) with each neuron of `intervention` applied alone at `layer` (rows): the same numbers
    as the naive engine, from one prefix per example batch and a suffix per chunk of neurons.

    `share_contexts` runs a context shared by several requests (the choices of a multiple-choice
    example) once per neuron, then each continuation from the cached state, where that is exact:
    True always, False never, None (the default) for each shape of group the way measured faster
    (`reading`). Mamba-2 on CPU scans in chunks fitted to the requests (`model.mamba2.short_chunks`).
    `timings`, when given, accumulates the seconds spent in the shared prefix ("prefix_s") and in
    the per-neuron work ("neurons_s")."""
    return fast_loglikelihoods_layers(model, tokenizer, encoded, {layer: intervention}, batch_size, progress,
                                      timings, share_contexts)[layer]


@torch.no_grad()
def fast_loglikelihoods_layers(model, tokenizer, encoded: list[Encoded], interventions: dict[int, Intervention],
                               batch_size: int | None = None, progress: bool = False, timings: dict | None = None,
                               share_contexts: bool | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """`fast_loglikelihoods` at several layers at once ({layer: its results}), each neuron applied
    alone at its own layer: every example batch's prefix is run once for all the layers, from the
    embeddings up, each layer's state taken on the way (a prefix per layer would rerun the blocks
    below it). A layer's numbers equal those of its own sweep up to float rounding."""
    if not covers(model):
        raise ValueError(f"the fast engine covers {', '.join(FAMILIES)} models, not {family_of(model).name}")
    for layer, intervention in interventions.items():
        check_layer(model, layer)
        check_neurons(model, intervention.neurons)
    results = {layer: (np.full((len(iv.neurons), len(encoded)), np.nan),
                       np.zeros((len(iv.neurons), len(encoded)), dtype=bool)) for layer, iv in interventions.items()}
    active = {layer: iv for layer, iv in sorted(interventions.items()) if iv.neurons}
    if not active or not encoded:
        return results
    share_contexts = share_contexts if continues_exactly(model) else False
    groups = context_groups(encoded) if share_contexts is not False else [[i] for i in range(len(encoded))]
    longest = max(len(e.tokens) for e in encoded)
    packed = batches(encoded, groups, batch_size, token_budget(model, longest))
    timings = timings if timings is not None else {}
    timings.setdefault("prefix_s", 0.0)
    timings.setdefault("neurons_s", 0.0)
    bar = tqdm(total=len(encoded) * sum(len(iv.neurons) for iv in active.values()),
               desc="fast sweep (neuron x request)", unit="pair", unit_scale=True, disable=not progress, leave=False)
    sweeps = [FastSweep(model, layer, iv, batch_size, TargetScorer(OutputHead(model), *results[layer], head_rows(model)),
                        share_contexts, bar) for layer, iv in active.items()]
    with short_chunks(model, longest):
        run(sweeps, tokenizer, encoded, packed, timings)
    bar.close()
    return results
