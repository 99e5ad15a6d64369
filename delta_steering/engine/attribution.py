"""Attribution: an estimate of every delta neuron's effect at once, a screen before exact measurement.

One forward and one backward pass per example batch estimate, for every neuron of layer L (or of
every layer of a set, from the same pass) intervened on alone, the change of each request's score.
The "mixer" screen (the default) computes block L's scan exactly with every channel intervened on
(the scan is channel-wise, so each channel is its neuron's own intervention) and linearises only the
blocks after it: `sum_t grad_y[i, t] * (y'[i, t] - y[i, t])`, the analogue of AtP*'s exact
recomputation of a saturating nonlinearity. The "gradient" screen linearises in dt_pre itself,
`sum_t grad[i, t] * (dt_pre'[i, t] - dt_pre[i, t])`: exact to first order for factors near 1, but an
ablation saturates softplus and the scan's decay, and it ranks strong neurons last
(benchmarks/bench_screen.py measures both against exact ablation). Either is a screen: step 1 and
the atlas re-measure the neurons it ranks first with the exact engine, and a random sample of the
rest to measure its recall.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..analysis.estimates import Attribution, estimated_impacts
from ..analysis.impacts import estimate_records, top_estimated
from ..data.tasks import Example
from ..intervention import Intervention, with_bias
from ..model.mamba1 import block_input, block_output, gated_scan, mixer_pieces, written_out_block
from ..model.placement import execution_device, input_device, weight
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


SCREENS = ("mixer", "gradient")  # see screened_block; measured against exact: benchmarks/bench_screen.py


def screened_block(block, hidden: Tensor, intervention: Intervention, screen: str) -> tuple[Tensor, Tensor, Tensor]:
    """A Mamba-1 block's output with its mixer written out (`mamba1.written_out_block`'s pieces), the
    leaf that the scores are differentiated by, and the change of that leaf's quantity that each
    neuron's intervention alone makes (batch x channels x tokens).

    "gradient": the leaf is an offset on dt_pre; the change is dt_pre' - dt_pre (first order in
    dt_pre: softplus and the scan's exp(Delta A) saturate under ablation, so large changes shrink).
    "mixer": the leaf is an offset on the gated scan output y; the change is y' - y with every
    channel intervened on in one scan. The scan is channel-wise, so channel i of that scan is exactly
    channel i's output with neuron i alone intervened on: the block is exact, only the blocks after
    it are linearised (the analogue of AtP*'s exact recomputation of the saturating attention)."""
    mixer = block.mixer
    leaf = torch.zeros(hidden.shape[0], mixer.intermediate_size, hidden.shape[1], device=execution_device(block),
                       requires_grad=True)
    if screen == "gradient":
        output, dt_pre = written_out_block(block, hidden, offset=leaf)
        return output, leaf, intervened(dt_pre.float(), intervention) - dt_pre.float()
    x, gate, dt_lin, B, C = mixer_pieces(block, hidden)
    dt_pre = with_bias(dt_lin, weight(mixer.dt_proj, "bias"), dim=1)
    A = -torch.exp(weight(mixer, "A_log").detach().float())

    def scan(dt: Tensor) -> Tensor:
        return gated_scan(x, dt, A, B[:, None], C[:, None], weight(mixer, "D").detach(), gate)

    y = scan(dt_pre)  # in the graph: the gradients of earlier written-out blocks pass through it
    with torch.no_grad():
        change = scan(intervened(dt_pre.detach().float(), intervention)) - y
    return block_output(block, hidden, y + leaf), leaf, change


def batch_gradients(model, interventions: dict[int, Intervention], ids: Tensor, items: list[Encoded],
                    lengths: list[int], kinds: list[str], screen: str = "mixer") -> tuple[Tensor, dict[int, Tensor]]:
    """Scores of one example batch and, per layer of `interventions`, every neuron's first-order
    estimate of each request's score change (neurons x batch): one forward and one backward pass.
    The blocks of those layers have their mixers written out (`screened_block`); the blocks
    before the first run without a graph, the other blocks after it are the real MambaBlocks. Rows
    of the batch are independent, so the gradient of the summed scores holds each request's own
    gradient in its row."""
    layers, blocks = sorted(interventions), decoder_layers(model)
    with torch.no_grad():
        hidden = block_input(model, ids, layers[0])
    leaves, changes = {}, {}
    with torch.enable_grad():
        for index in range(layers[0], len(blocks)):
            if index not in interventions:
                hidden = blocks[index](hidden)
                continue
            hidden, leaves[index], changes[index] = screened_block(blocks[index], hidden, interventions[index], screen)
        scores = request_scores(OutputHead(model), model.backbone.norm_f(hidden), items, lengths, kinds)
        grads = torch.autograd.grad(scores.sum(), [leaves[i] for i in layers])
    valid = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    estimates = {}
    for layer, grad in zip(layers, grads):  # each on its block's device
        mask = valid.to(grad.device)[:, None, :]
        estimates[layer] = (grad.float() * changes[layer].float() * mask).sum(-1).T
    return scores.detach(), estimates


def intervened(dt_pre: Tensor, intervention: Intervention) -> Tensor:
    """dt_pre' of every channel (batch x channels x tokens), each intervened on as `intervention`
    says (it must cover every delta neuron of the layer, in order)."""
    lin, bias = intervention.edit(dt_pre.transpose(0, 1), torch.zeros(dt_pre.shape[1], device=dt_pre.device))
    return (lin + bias[:, None, None]).transpose(0, 1)


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
                       progress: bool = False, screen: str = "mixer") -> dict[int, Attribution]:
    """Estimates at several layers from one forward and one backward pass per batch:
    for every layer of `interventions` and every delta neuron of it intervened on alone (as that
    layer's intervention says; it covers all delta neurons of the layer), every request's score change.
    `screen`: what is linearised (`written_out_block`)."""
    check_covered(model, interventions)
    if screen not in SCREENS:
        raise ValueError(f"unknown screen {screen!r}: use one of {', '.join(SCREENS)}")
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
        scores, estimates = batch_gradients(model, interventions, ids, items, lengths, [kinds[i] for i in batch],
                                            screen)
        base[batch] = scores.cpu().numpy()
        for layer in layers:
            delta[layer][:, batch] = estimates[layer].double().cpu().numpy()
    return {layer: Attribution(base, delta[layer], tuple(kinds)) for layer in layers}


def attribution(model, tokenizer, examples: list[Example], encoded: list[Encoded], layer: int,
                intervention: Intervention, batch_size: int | None = None, progress: bool = False,
                screen: str = "mixer") -> Attribution:
    """First-order estimate, for every delta neuron of `layer` intervened on alone, of every request's
    score change. `intervention` names what is done to each neuron: all delta neurons of the layer.
    The one-layer case of `layer_attributions`."""
    return layer_attributions(model, tokenizer, examples, encoded, {layer: intervention}, batch_size,
                              progress, screen)[layer]


def attribution_screen(model, tokenizer, examples, encoded, layer: int, neurons: list[int],
                       ablation: Intervention, batch_size: int | None, top: int) -> tuple[list[dict], list[int]]:
    """Estimates of every neuron's ablation effect (one forward and backward pass per batch), and
    the `top` neurons to re-measure exactly: largest estimated impact, then margin loss."""
    att = attribution(model, tokenizer, examples, encoded, layer, ablation, batch_size, progress=True)
    estimates = estimate_records(neurons, *estimated_impacts(examples, att))
    return estimates, top_estimated(estimates, top)


def atlas_estimates(model, tokenizer, examples: list[Example], encoded: list[Encoded],
                    ablations: dict[int, Intervention], batch_size: int | None = None,
                    progress: bool = False) -> dict[int, list[dict]]:
    """Per layer, every neuron's estimates (estimated impact and margin loss, see
    attribution.estimated_impacts) from one forward and one backward pass per batch."""
    attributions = layer_attributions(model, tokenizer, examples, encoded, ablations, batch_size, progress)
    return {layer: estimate_records(range(att.delta.shape[0]), *estimated_impacts(examples, att))
            for layer, att in attributions.items()}
