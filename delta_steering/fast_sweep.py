"""Fast exact single-neuron sweeps, and a first-order (attribution) estimate of every neuron's effect.

Why the fast engine is exact, not an approximation: steering delta neuron i of layer L changes only
`dt_pre[..., i]`, so only channel i of layer L's selective scan (the scan's channels are independent;
B and C come from `x_proj`, upstream of `dt_proj`). Layer L's output therefore changes by a rank-1
term, `out_L' = out_L + W_out[:, i] * (y_i' - y_i)`, with y the gated scan output. Per batch of
examples the engine

1. runs the embeddings, blocks 0..L-1 and block L once (the prefix, shared by every neuron);
2. recomputes channel i's scan with the new `dt_pre_i` (an N-dimensional state: cheap), for many
   neurons and examples at once;
3. stacks the corrected layer-L outputs of (neuron, example) pairs along the batch dimension and runs
   the real blocks L+1..end, `norm_f`, and the LM head at the scored positions only.

A neuron then costs layers L+1..end (3 of 24 at mamba-130m's default layer 20) instead of the whole
model. Two more exact savings: requests that share their context (the choices of a multiple-choice
example) run it once per neuron and continue token by token from the cached state, and the LM head
runs on many chunks' scored positions at once. Results equal the naive engine's
(`sweep._naive_loglikelihoods`) up to float rounding (~1e-6 relative).

The attribution estimate is first order: one forward and one backward pass per example batch give
d(score)/d(dt_pre) at layer L for every neuron and token, and the estimated change of a request's
score when neuron i is steered is `sum_t grad[i, t] * (dt_pre'[i, t] - dt_pre[i, t])`.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .scoring import Encoded, choice_lengths, correctness, example_weights, make_batches, pad_batch, target_scores, token_budget
from .steering import check_neurons, dt_proj, mamba_layers, num_delta_neurons
from .sweep import Intervention
from .tasks import Example


# ----------------------------------------------------------------------------------------------
# layer L, taken apart


@dataclass
class LayerState:
    """Block L on one right-padded example batch, kept while the batch's neurons are swept.
    Channel-first like transformers' mixer: (batch, channels, tokens)."""

    output: Tensor  # the residual stream after block L, from the real block (batch x tokens x hidden)
    x: Tensor  # post-conv activations u (batch x channels x tokens), model dtype
    gate: Tensor  # z (batch x channels x tokens), model dtype
    dt_lin: Tensor  # W_dt t without the bias (batch x channels x tokens), model dtype
    B: Tensor  # batch x tokens x state
    C: Tensor  # batch x tokens x state


def block_input(model, ids: Tensor, layer: int) -> Tensor:
    """The residual stream entering block `layer`: embeddings and blocks 0..layer-1."""
    hidden = model.backbone.embeddings(ids)
    for block in mamba_layers(model)[:layer]:
        hidden = block(hidden)
    return hidden


def mixer_pieces(block, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x, gate, W_dt t, B and C of a block's mixer, computed as transformers' reference path does
    (MambaBlock.norm, in_proj, causal depthwise conv + SiLU, x_proj, `dt_proj.weight @ t`)."""
    mixer = block.mixer
    normed = block.norm(hidden.to(dtype=block.norm.weight.dtype))
    tokens = normed.shape[1]
    x, gate = mixer.in_proj(normed).transpose(1, 2).chunk(2, dim=1)
    x = mixer.act(mixer.conv1d(x.to(mixer.conv1d.weight.dtype))[..., :tokens]).to(gate.dtype)
    time_step, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)),
                                  [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    dt_lin = mixer.dt_proj.weight @ time_step.transpose(1, 2)
    return x, gate, dt_lin, B, C


@torch.no_grad()
def layer_state(model, ids: Tensor, layer: int) -> LayerState:
    """Run the prefix once: block L's real output and the pieces its mixer scans."""
    block = mamba_layers(model)[layer]
    hidden = block_input(model, ids, layer)
    return LayerState(block(hidden), *mixer_pieces(block, hidden))


def gated_scan(x: Tensor, dt_pre: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, gate: Tensor) -> Tensor:
    """Mamba's selective scan with its D skip and SiLU gate, for any leading dimensions, in float32 as
    transformers' reference `mamba_selective_scan` computes it.

    x, dt_pre, gate: (..., tokens); A: (..., state); D: (...); B, C: (..., tokens, state), broadcast.
    Returns the gated output y, float32 (..., tokens). The recurrence is a loop over tokens, as in
    transformers; each step touches only (..., state), so for single channels it is cheap.
    A cumulative-sum form, exp(A * (S_t - S_s)) with S the running sum of Delta, would avoid the loop
    but loses about |A| * S * 2^-24 of relative precision (1e-4 for |A| = 16, S = 100): not exact."""
    dt = F.softplus(dt_pre).float()
    decay = torch.exp(A[..., None, :] * dt[..., None])  # (..., tokens, state)
    drive = dt[..., None] * B.float() * x.float()[..., None]
    decay, drive = decay.movedim(-2, 0), drive.movedim(-2, 0)  # tokens first: contiguous steps
    state = torch.zeros_like(drive[0])
    states = []
    for step in range(decay.shape[0]):
        state = decay[step] * state + drive[step]
        states.append(state)
    y = (torch.stack(states, dim=-2) * C.float()).sum(-1)
    y = y + x.float() * D.float()[..., None]
    return y * F.silu(gate).float()


# ----------------------------------------------------------------------------------------------
# the exact fast engine


def steered_dt(model, layer: int, dt_lin: Tensor, neurons: list[int],
               intervention: Intervention) -> tuple[Tensor, Tensor]:
    """`dt_pre` of channels `neurons` before and after the intervention, (neurons, batch, tokens).

    The naive engine scales row i of W_dt and entry i of the bias by k (or zeroes the row and sets
    the bias to the mean); this is the same arithmetic on the cached W_dt t, in the model's dtype."""
    proj = dt_proj(model, layer)
    rows = torch.tensor(neurons, device=dt_lin.device)
    lin = dt_lin[:, rows].transpose(0, 1)  # (neurons, batch, tokens)
    bias = proj.bias.detach()[rows]
    before = lin + bias.float().to(lin.dtype)[:, None, None]
    if intervention.mode == "mean":
        means = torch.tensor([intervention.means[i] for i in neurons], dtype=torch.float32, device=lin.device)
        after = torch.zeros_like(lin) + means.to(bias.dtype).float().to(lin.dtype)[:, None, None]
    elif intervention.mode == "scale":
        factor = torch.tensor(float(intervention.factor), dtype=torch.float32)
        after = lin * factor.to(lin.dtype) + (bias * factor.to(bias.dtype)).float().to(lin.dtype)[:, None, None]
    else:
        raise ValueError(f'unknown intervention mode {intervention.mode!r}: use "scale" or "mean"')
    return before, after


def output_change(model, layer: int, state: LayerState, neurons: list[int], intervention: Intervention) -> Tensor:
    """The change of y_i (gated scan output of channel i) when neuron i alone is steered,
    float32 (neurons, batch, tokens). Both scans run through the same code, so the difference has
    no offset from summation order."""
    mixer = mamba_layers(model)[layer].mixer
    rows = torch.tensor(neurons, device=state.x.device)
    before, after = steered_dt(model, layer, state.dt_lin, neurons, intervention)
    x = state.x[:, rows].transpose(0, 1)  # (neurons, batch, tokens)
    gate = state.gate[:, rows].transpose(0, 1)
    A = -torch.exp(mixer.A_log.detach()[rows].float())[:, None, :]  # (neurons, 1, state)
    D = mixer.D.detach()[rows][:, None]
    y = gated_scan(x, torch.stack([before, after]), A, state.B[None, :, :, :], state.C[None, :, :, :], D, gate)
    return y[1] - y[0]


def steered_outputs(model, layer: int, state: LayerState, neurons: list[int], intervention: Intervention) -> Tensor:
    """Block L's output with each neuron steered alone: the rank-1 correction
    out_L + W_out[:, i] * (y_i' - y_i), stacked (neurons * batch, tokens, hidden), neuron-major."""
    change = output_change(model, layer, state, neurons, intervention)
    columns = mamba_layers(model)[layer].mixer.out_proj.weight.detach()[:, neurons].T.float()  # (neurons, hidden)
    hidden = state.output.float()[None] + change[..., None] * columns[:, None, None, :]
    return hidden.to(state.output.dtype).flatten(0, 1)


def suffix(model, layer: int, hidden: Tensor, cache=None) -> Tensor:
    """Blocks layer+1..end (the real MambaBlocks) and the final norm."""
    for block in mamba_layers(model)[layer + 1:]:
        hidden = block(hidden, cache=cache) if cache is not None else block(hidden)
    return model.backbone.norm_f(hidden)


# ----------------------------------------------------------------------------------------------
# shared contexts: the choices of a multiple-choice example read the same context tokens


def context_groups(encoded: list[Encoded]) -> list[list[int]]:
    """Requests whose context tokens (all but the continuation) are identical, in first-seen order.
    Mamba is causal, so their states agree up to the last context token."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.tokens[: len(e.tokens) - e.n_target], []).append(i)
    return list(groups.values())


def suffix_cache(model):
    """A fresh transformers cache for the blocks after layer L, or None where this transformers
    version's MambaBlock does not take the 5.x `cache=` argument (contexts are then not shared)."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin  # noqa: F401  (5.x Mamba caches)
    except ImportError:
        return None
    if "cache" not in inspect.signature(type(mamba_layers(model)[0]).forward).parameters:
        return None
    return DynamicCache(config=model.config)


def group_batches(encoded: list[Encoded], groups: list[list[int]], batch_size: int | None,
                  budget: int) -> list[list[list[int]]]:
    """Whole groups packed longest first into example batches of `batch_size` requests, or as many
    as fit `budget` tokens (scoring.make_batches's rule, which this is when every group is one request)."""
    widths = [max(len(encoded[i].tokens) for i in g) - 1 for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-widths[k], groups[k][0]))
    batches, current, n, width = [], [], 0, 0
    for k in order:
        size = n + len(groups[k])
        full = size > batch_size if batch_size else size * (width if current else widths[k]) > budget
        if current and full:
            batches.append(current)
            current, n = [], 0
        if not current:
            width = widths[k]  # the first group of a batch is its longest
        current.append(groups[k])
        n += len(groups[k])
    if current:
        batches.append(current)
    return batches


def shared_context_hidden(model, layer: int, steered: Tensor, items: list[Encoded], cache) -> Tensor:
    """Final hidden states at the scored positions of one group's (neuron, member) pairs: the shared
    context runs once per neuron, then each member's continuation token by token from the cached
    state (transformers' generation path of the same blocks).

    steered: block L's steered output (neurons x members x tokens x hidden), the members sharing
    their first `context` positions. Returns (neurons, members, max targets, hidden)."""
    n_neurons, n_members = steered.shape[:2]
    context = len(items[0].tokens) - items[0].n_target  # input positions 0..context-1 are shared
    tails = [e.n_target - 1 for e in items]  # the inputs after the context, read one by one
    last = suffix(model, layer, steered[:, 0, :context], cache)[:, -1]  # predicts every first target
    out = last.new_zeros(n_neurons, n_members, max(tails) + 1, last.shape[-1])
    out[:, :, 0] = last[:, None]
    order = sorted(range(n_members), key=lambda j: -tails[j])  # members still reading stay a prefix
    neurons = torch.arange(n_neurons, device=steered.device)
    active = 0
    for step in range(max(tails)):
        keep = sum(tails[j] > step for j in order)
        if keep != active:  # cache rows are member-major: row = rank * n_neurons + neuron
            cache.reorder_cache(neurons.repeat(keep) if step == 0 else torch.arange(keep * n_neurons,
                                                                                    device=steered.device))
            active = keep
        members = order[:active]
        token = steered[:, members, context + step].transpose(0, 1).reshape(active * n_neurons, 1, -1)
        hidden = suffix(model, layer, token, cache).view(active, n_neurons, -1)
        out[:, members, step + 1] = hidden.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------
# the LM head, batched over chunks


class TargetScorer:
    """Collects final hidden states at scored positions and applies the LM head to many chunks at
    once (one large matmul is about twice as fast per row on CPU as many small ones), writing each
    pair's summed log-prob and greedy flag into the sweep's arrays."""

    def __init__(self, lm_head, logprob: np.ndarray, greedy: np.ndarray, max_rows: int):
        self.lm_head, self.logprob, self.greedy, self.max_rows = lm_head, logprob, greedy, max_rows
        self.pending: list[tuple[Tensor, list[Encoded], np.ndarray, np.ndarray]] = []
        self.rows = 0

    def add(self, compact: Tensor, items: list[Encoded], neuron_rows, request_cols) -> None:
        """compact: (pairs, max targets, hidden), target k of pair p at [p, k]."""
        self.pending.append((compact, items, np.asarray(neuron_rows), np.asarray(request_cols)))
        self.rows += sum(e.n_target for e in items)
        if self.rows >= self.max_rows:
            self.flush()

    def add_sequences(self, hidden: Tensor, items: list[Encoded], lengths: list[int], neuron_rows,
                      request_cols) -> None:
        """hidden: (pairs, tokens, hidden) final states of right-padded sequences."""
        width = max(e.n_target for e in items)
        first = torch.tensor([n - e.n_target for e, n in zip(items, lengths)], device=hidden.device)
        index = (first[:, None] + torch.arange(width, device=hidden.device)).clamp_max(hidden.shape[1] - 1)
        compact = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        self.add(compact, items, neuron_rows, request_cols)

    def flush(self) -> None:
        if not self.pending:
            return
        width = max(c.shape[1] for c, *_ in self.pending)
        compact = torch.cat([F.pad(c, (0, 0, 0, width - c.shape[1])) for c, *_ in self.pending])
        items = [e for _, chunk, *_ in self.pending for e in chunk]
        values, flags = target_scores(self.lm_head, compact, items, [e.n_target for e in items])
        rows = np.concatenate([r for *_, r, _ in self.pending])
        cols = np.concatenate([c for *_, c in self.pending])
        self.logprob[rows, cols], self.greedy[rows, cols] = values, flags
        self.pending, self.rows = [], 0


def head_rows(model) -> int:
    """Scored positions per LM-head call: the logits (rows x vocab, float32) and their log-softmax
    within the memory budget of one forward."""
    vocab = model.lm_head.out_features
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(64, int(0.25 * free / (vocab * 4 * 4)))
    return max(64, 2**28 // (vocab * 4 * 4))


# ----------------------------------------------------------------------------------------------
# the sweep


def neurons_per_chunk(model, pairs_per_neuron: int, width: int, batch_size: int | None) -> int:
    """How many neurons share one suffix forward: their (neuron, sequence) pairs fill the user's batch
    size in sequences, or else the memory budget of one forward in tokens."""
    pairs = batch_size or token_budget(model, width) // width
    return max(1, pairs // pairs_per_neuron)


def sweep_batch(model, layer: int, state: LayerState, items: list[Encoded], lengths: list[int],
                columns: list[int], groups: list[list[int]], neurons: list[int], intervention: Intervention,
                batch_size: int | None, scorer: TargetScorer, share_contexts: bool, bar) -> None:
    """Every neuron on one example batch: requests alone in their group stacked as whole sequences,
    groups that share a context through `shared_context_hidden`. groups index into `items`;
    columns[i] is item i's request index."""
    singles = [g[0] for g in groups if len(g) == 1]
    jobs = [(singles, False, neurons_per_chunk(model, len(singles), max(lengths[i] for i in singles), batch_size))] \
        if singles else []
    for group in (g for g in groups if len(g) > 1):
        context = len(items[group[0]].tokens) - items[group[0]].n_target
        jobs.append((group, share_contexts, neurons_per_chunk(model, 1 if share_contexts else len(group), context,
                                                               batch_size)))
    for members, shared, step in jobs:
        sub = LayerState(*(t[members] for t in (state.output, state.x, state.gate, state.dt_lin, state.B, state.C)))
        sub_items = [items[i] for i in members]
        width = max(lengths[i] for i in members)
        for first in range(0, len(neurons), step):
            chunk = neurons[first: first + step]
            steered = steered_outputs(model, layer, sub, chunk, intervention)
            neuron_rows = np.repeat(np.arange(first, first + len(chunk)), len(members))
            request_cols = np.tile([columns[i] for i in members], len(chunk))
            if shared:
                steered = steered.view(len(chunk), len(members), *steered.shape[1:])
                compact = shared_context_hidden(model, layer, steered, sub_items, suffix_cache(model))
                scorer.add(compact.flatten(0, 1), sub_items * len(chunk), neuron_rows, request_cols)
            else:
                hidden = suffix(model, layer, steered[:, :width])
                scorer.add_sequences(hidden, sub_items * len(chunk), [lengths[i] for i in members] * len(chunk),
                                     neuron_rows, request_cols)
            bar.update(len(chunk) * len(members))


@torch.no_grad()
def fast_loglikelihoods(model, tokenizer, encoded: list[Encoded], layer: int, neurons: list[int],
                        intervention: Intervention, batch_size: int | None = None, progress: bool = False,
                        timings: dict | None = None, share_contexts: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob (NaN where logits are not finite) and all-greedy flag of every request
    (columns) with each neuron of `neurons` steered alone at `layer` (rows): the same numbers as
    the naive engine, from one prefix per example batch and a suffix per chunk of neurons.

    `share_contexts` runs a context shared by several requests (the choices of a multiple-choice
    example) once per neuron, then each continuation from the cached state. `timings`, when given,
    accumulates the seconds spent in the shared prefix ("prefix_s") and in the per-neuron work
    ("neurons_s")."""
    neurons = check_neurons(model, neurons)
    dt_proj(model, layer)  # checks the layer
    if intervention.mode == "mean" and (intervention.means is None
                                        or len(intervention.means) != num_delta_neurons(model)):
        raise ValueError("mean ablation needs one mean per delta neuron of the layer")
    logprob = np.full((len(neurons), len(encoded)), np.nan)
    greedy = np.zeros((len(neurons), len(encoded)), dtype=bool)
    if not neurons or not encoded:
        return logprob, greedy
    device = next(model.parameters()).device
    share_contexts = share_contexts and suffix_cache(model) is not None
    groups = context_groups(encoded) if share_contexts else [[i] for i in range(len(encoded))]
    batches = group_batches(encoded, groups, batch_size, token_budget(model, max(len(e.tokens) for e in encoded)))
    scorer = TargetScorer(model.lm_head, logprob, greedy, head_rows(model))
    timings = timings if timings is not None else {}
    timings.setdefault("prefix_s", 0.0)
    timings.setdefault("neurons_s", 0.0)
    bar = tqdm(total=len(encoded) * len(neurons), desc="fast sweep", disable=not progress, leave=False)
    for batch_groups in batches:
        start = time.perf_counter()
        columns = [i for g in batch_groups for i in g]
        items = [encoded[i] for i in columns]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        state = layer_state(model, ids, layer)
        timings["prefix_s"] += time.perf_counter() - start
        start = time.perf_counter()
        local, at = [], 0
        for g in batch_groups:
            local.append(list(range(at, at + len(g))))
            at += len(g)
        sweep_batch(model, layer, state, items, lengths, columns, local, neurons, intervention, batch_size,
                    scorer, share_contexts, bar)
        scorer.flush()
        timings["neurons_s"] += time.perf_counter() - start
    bar.close()
    return logprob, greedy


# ----------------------------------------------------------------------------------------------
# attribution: a first-order estimate of every neuron at once


@dataclass
class Attribution:
    """First-order estimates for every delta neuron of a layer.

    Each request has a differentiable *score*: its summed target log-prob ("logprob", for acc and
    acc_norm examples), or for greedy examples (lambada) its greedy margin ("margin"): the smallest,
    over its target tokens, of logit(target) - max logit(other token), positive iff all are greedy.
    `base` is each request's score without steering and `delta[i, r]` the estimated change of
    request r's score when neuron i alone is steered."""

    base: np.ndarray  # (requests,)
    delta: np.ndarray  # (delta neurons, requests)
    kinds: tuple[str, ...]  # "logprob" or "margin", per request


def request_scores(lm_head, hidden: Tensor, items: list[Encoded], lengths: list[int], kinds: list[str]) -> Tensor:
    """Each request's score (see Attribution), differentiable; the LM head runs on target positions only."""
    rows = [r for r, e in enumerate(items) for _ in range(e.n_target)]
    positions = [p for e, n in zip(items, lengths) for p in range(n - e.n_target, n)]
    targets = torch.tensor([t for e in items for t in e.tokens[-e.n_target:]], device=hidden.device)[:, None]
    logits = lm_head(hidden[rows, positions].to(lm_head.weight.dtype)).float()
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0]
    margin = logits.gather(-1, targets)[:, 0] - logits.scatter(-1, targets, -torch.inf).amax(-1)
    sizes = [e.n_target for e in items]
    scores = [lp.sum() if kind == "logprob" else m.min()
              for lp, m, kind in zip(logprob.split(sizes), margin.split(sizes), kinds)]
    return torch.stack(scores)


def dt_pre_change(dt_pre: Tensor, neurons_dim: int, intervention: Intervention) -> Tensor:
    """dt_pre' - dt_pre for every channel, each steered as the intervention says."""
    if intervention.mode == "mean":
        shape = [1] * dt_pre.dim()
        shape[neurons_dim] = -1
        means = torch.tensor(intervention.means, dtype=torch.float32, device=dt_pre.device).view(shape)
        return means - dt_pre
    return (float(intervention.factor) - 1.0) * dt_pre


def batch_gradient(model, layer: int, ids: Tensor, items: list[Encoded], lengths: list[int],
                   kinds: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Scores of one example batch, and their gradient with respect to `dt_pre` of layer L
    (batch x channels x tokens): one forward and one backward pass. Block L's mixer is written out
    (with the same pieces as the fast engine) so that dt_pre is a leaf; the blocks after it are the
    real MambaBlocks. Rows of the batch are independent, so the gradient of the summed scores holds
    each request's own gradient in its row."""
    block = mamba_layers(model)[layer]
    mixer = block.mixer
    with torch.no_grad():
        hidden = block_input(model, ids, layer)
        x, gate, dt_lin, B, C = mixer_pieces(block, hidden)
        residual = hidden.float() if block.residual_in_fp32 else hidden
        dt_pre = dt_lin + mixer.dt_proj.bias.float().to(dt_lin.dtype)[:, None]
    dt_pre = dt_pre.detach().requires_grad_(True)
    with torch.enable_grad():
        A = -torch.exp(mixer.A_log.detach().float())
        y = gated_scan(x, dt_pre, A, B[:, None], C[:, None], mixer.D.detach(), gate)
        out = residual + mixer.out_proj(y.transpose(1, 2).to(mixer.out_proj.weight.dtype))
        scores = request_scores(model.lm_head, suffix(model, layer, out), items, lengths, kinds)
        (grad,) = torch.autograd.grad(scores.sum(), dt_pre)
    return scores.detach(), grad, dt_pre.detach()


def attribution(model, tokenizer, examples: list[Example], encoded: list[Encoded], layer: int,
                intervention: Intervention, batch_size: int | None = None, progress: bool = False) -> Attribution:
    """First-order estimate, for every delta neuron of `layer` steered alone, of every request's
    score change: sum over tokens of d(score)/d(dt_pre_i) * (dt_pre_i' - dt_pre_i). Exact to first
    order in the change of dt_pre: good for factors near 1, a ranking heuristic for ablation."""
    dt_proj(model, layer)
    kinds = [("margin" if e.metric == "greedy" else "logprob") for e in examples for _ in e.requests]
    if len(kinds) != len(encoded):
        raise ValueError(f"{len(encoded)} encoded requests for {len(kinds)} requests of the examples")
    if intervention.mode == "mean" and (intervention.means is None
                                        or len(intervention.means) != num_delta_neurons(model)):
        raise ValueError("mean ablation needs one mean per delta neuron of the layer")
    device = next(model.parameters()).device
    width = max(len(e.tokens) for e in encoded)
    # the backward pass keeps each later block's scan tensors: shrink the budget accordingly
    after = len(mamba_layers(model)) - layer
    budget = max(width, token_budget(model, width) // (2 * after))
    base = np.full(len(encoded), np.nan)
    delta = np.full((num_delta_neurons(model), len(encoded)), np.nan)
    for batch in tqdm(make_batches(encoded, batch_size, budget), desc="attribution", disable=not progress,
                      leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        scores, grad, dt_pre = batch_gradient(model, layer, ids, items, lengths, [kinds[i] for i in batch])
        valid = torch.arange(ids.shape[1], device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        change = dt_pre_change(dt_pre.float(), 1, intervention) * valid[:, None, :]
        base[batch] = scores.cpu().numpy()
        delta[:, batch] = (grad.float() * change).sum(-1).T.double().cpu().numpy()
    return Attribution(base, delta, tuple(kinds))


def attribution_estimates(model, tokenizer, examples: list[Example], encoded: list[Encoded], layer: int,
                          intervention: Intervention, batch_size: int | None = None) -> np.ndarray:
    """(delta neurons, requests): estimated change of each request's score (summed log-prob, or the
    greedy margin for greedy examples; see Attribution) when each neuron alone is steered."""
    return attribution(model, tokenizer, examples, encoded, layer, intervention, batch_size).delta


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
        if example.metric == "greedy":
            out.append(values[..., 0])
            continue
        if example.metric == "acc_norm":
            values = values / choice_lengths(example)
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
