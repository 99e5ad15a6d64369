"""Attribution: a first-order estimate of every delta neuron's effect at once.

One forward and one backward pass per example batch give d(score)/d(dt_pre) at layer L (or at every
layer of a set, from the same pass) for every neuron and token; the estimated change of a request's score when neuron i alone is intervened on is
`sum_t grad[i, t] * (dt_pre'[i, t] - dt_pre[i, t])`. Exact to first order in the change of dt_pre:
good for factors near 1, a ranking heuristic for ablation, which is why step 1 re-measures the
neurons it ranks first with the exact engine.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..analysis.estimates import Attribution, estimated_impacts
from ..analysis.impacts import estimate_records, top_estimated
from ..data.tasks import Example
from ..intervention import Intervention
from ..model.mamba1 import block_input, written_out_block
from ..model.placement import execution_device, input_device
from ..model.sites import OutputHead, check_layer, decoder_layers, family_of, num_delta_neurons
from ..progress import tqdm
from .batching import Encoded, gather_targets, pad_batch, request_batches, target_logits, token_budget

FAMILIES = ("mamba", "falcon_mamba")  # the Mamba-1 models: block L's channel-wise mixer written out


def covers(model) -> bool:
    """Whether attribution applies to this model's family: it writes out a Mamba-1 mixer (model.mamba1)."""
    return family_of(model).name in FAMILIES


def request_scores(head: OutputHead, hidden: Tensor, items: list[Encoded], lengths: list[int],
                   kinds: list[str]) -> Tensor:
    """Each request's score (see Attribution), differentiable; the LM head runs on target positions only."""
    logits, targets = target_logits(head, gather_targets(hidden, items, lengths), items)
    targets = targets[:, None]
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0]
    margin = logits.gather(-1, targets)[:, 0] - logits.scatter(-1, targets, -torch.inf).amax(-1)
    sizes = [e.n_target for e in items]
    scores = [lp.sum() if kind == "logprob" else m.min()
              for lp, m, kind in zip(logprob.split(sizes), margin.split(sizes), kinds)]
    return torch.stack(scores)


def batch_gradients(model, layers: list[int], ids: Tensor, items: list[Encoded], lengths: list[int],
                    kinds: list[str]) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """Scores of one example batch, and per layer of `layers` their gradient with respect to that
    layer's `dt_pre` and dt_pre itself (batch x channels x tokens): one forward and one backward pass.
    The blocks of `layers` have their mixers written out (the fast engine's pieces) with a zero
    offset on dt_pre as the leaf; the blocks before the first run without a graph, the other blocks
    after it are the real MambaBlocks. Rows of the batch are independent, so the gradient of the
    summed scores holds each request's own gradient in its row."""
    first, blocks = min(layers), decoder_layers(model)
    with torch.no_grad():
        hidden = block_input(model, ids, first)
    offsets, dt_pre = {}, {}
    with torch.enable_grad():
        for index in range(first, len(blocks)):
            if index not in layers:
                hidden = blocks[index](hidden)
                continue
            channels = blocks[index].mixer.intermediate_size
            offsets[index] = torch.zeros(ids.shape[0], channels, ids.shape[1], device=execution_device(blocks[index]),
                                         requires_grad=True)
            hidden, dt_pre[index] = written_out_block(blocks[index], hidden, offset=offsets[index])
        scores = request_scores(OutputHead(model), model.backbone.norm_f(hidden), items, lengths, kinds)
        grads = torch.autograd.grad(scores.sum(), [offsets[i] for i in layers])
    return scores.detach(), dict(zip(layers, grads)), dt_pre


def dt_pre_change(dt_pre: Tensor, intervention: Intervention) -> Tensor:
    """dt_pre' - dt_pre of every channel (batch x channels x tokens), each intervened on as
    `intervention` says (it must cover every delta neuron of the layer, in order)."""
    lin, bias = intervention.edit(dt_pre.transpose(0, 1), torch.zeros(dt_pre.shape[1], device=dt_pre.device))
    return (lin + bias[:, None, None]).transpose(0, 1) - dt_pre


def check_covered(model, interventions: dict[int, Intervention]) -> None:
    """Attribution applies to this model and to these (layer -> intervention on every delta neuron)."""
    if not covers(model):
        raise ValueError(f"attribution covers {', '.join(FAMILIES)} models, not {family_of(model).name}")
    if not interventions:
        raise ValueError("attribution needs at least one layer")
    for layer, intervention in interventions.items():
        check_layer(model, layer)
        if list(intervention.neurons) != list(range(num_delta_neurons(model))):
            raise ValueError("attribution needs an intervention on every delta neuron of the layer, in order")


def layer_attributions(model, tokenizer, examples: list[Example], encoded: list[Encoded],
                       interventions: dict[int, Intervention], batch_size: int | None = None,
                       progress: bool = False) -> dict[int, Attribution]:
    """First-order estimates at several layers from one forward and one backward pass per batch:
    for every layer of `interventions` and every delta neuron of it intervened on alone (as that
    layer's intervention says; it covers all delta neurons of the layer), every request's score change."""
    check_covered(model, interventions)
    layers = sorted(interventions)
    kinds = [("margin" if e.metric == "greedy" else "logprob") for e in examples for _ in e.requests]
    if len(kinds) != len(encoded):
        raise ValueError(f"{len(encoded)} encoded requests for {len(kinds)} requests of the examples")
    device = input_device(model)
    width = max(len(e.tokens) for e in encoded)
    # the backward pass keeps each later block's scan tensors: shrink the budget accordingly
    after = len(decoder_layers(model)) - layers[0]
    budget = max(width, token_budget(model, width) // (2 * after))
    base = np.full(len(encoded), np.nan)
    delta = {layer: np.full((num_delta_neurons(model), len(encoded)), np.nan) for layer in layers}
    for batch in tqdm(request_batches(encoded, batch_size, budget), desc="attribution", unit="batch",
                      disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        scores, grads, dt_pre = batch_gradients(model, layers, ids, items, lengths, [kinds[i] for i in batch])
        valid = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        base[batch] = scores.cpu().numpy()
        for layer in layers:  # each on its block's device
            mask = valid.to(dt_pre[layer].device)[:, None, :]
            change = dt_pre_change(dt_pre[layer].float(), interventions[layer]) * mask
            delta[layer][:, batch] = (grads[layer].float() * change).sum(-1).T.double().cpu().numpy()
    return {layer: Attribution(base, delta[layer], tuple(kinds)) for layer in layers}


def attribution(model, tokenizer, examples: list[Example], encoded: list[Encoded], layer: int,
                intervention: Intervention, batch_size: int | None = None, progress: bool = False) -> Attribution:
    """First-order estimate, for every delta neuron of `layer` intervened on alone, of every request's
    score change. `intervention` names what is done to each neuron: all delta neurons of the layer.
    The one-layer case of `layer_attributions`."""
    return layer_attributions(model, tokenizer, examples, encoded, {layer: intervention}, batch_size,
                              progress)[layer]


def attribution_screen(model, tokenizer, examples, encoded, layer: int, neurons: list[int],
                       ablation: Intervention, batch_size: int | None, top: int) -> tuple[list[dict], list[int]]:
    """First-order estimates of every neuron's ablation effect (one forward and backward pass per
    batch), and the `top` neurons to re-measure exactly: largest estimated impact, then margin loss."""
    att = attribution(model, tokenizer, examples, encoded, layer, ablation, batch_size, progress=True)
    estimates = estimate_records(neurons, *estimated_impacts(examples, att))
    return estimates, top_estimated(estimates, top)


def atlas_estimates(model, tokenizer, examples: list[Example], encoded: list[Encoded],
                    ablations: dict[int, Intervention], batch_size: int | None = None,
                    progress: bool = False) -> dict[int, list[dict]]:
    """Per layer, every neuron's first-order estimates (estimated impact and margin loss, see
    attribution.estimated_impacts) from one forward and one backward pass per batch."""
    attributions = layer_attributions(model, tokenizer, examples, encoded, ablations, batch_size, progress)
    return {layer: estimate_records(range(att.delta.shape[0]), *estimated_impacts(examples, att))
            for layer, att in attributions.items()}
