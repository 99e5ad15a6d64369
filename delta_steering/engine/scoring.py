"""Log-likelihood scoring of continuations, as lm-evaluation-harness computes it, and accuracy.

Context and continuation are tokenised the lm-eval way (trailing spaces of the context move to the
continuation, the pair is encoded whole and split at the context's length, no special tokens, an
empty context is preceded by EOS). The LM head runs only where a continuation token is predicted.
acc is the argmax of summed log-prob, acc_norm of log-prob per character of the choice (lm-eval's
`len(choice)`), and a greedy example (lambada) is correct when every target token is the argmax.

Requests whose context tokens are identical (the choices of a multiple-choice example) can run that
context once (`continuation`): each context is read once, its per-layer state (conv window and SSM
state) is cached and replicated, and each continuation is read as one block from it, exactly (see
`continuation.continues_exactly`). Contexts of equal length share a forward (no padding to mask),
and the continuations of many examples run together. Whether that is faster than reading the
requests whole depends on the family and the shape of the requests, so it is measured (`reading`).
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from ..analysis.metrics import correctness
from ..data.tasks import Example
from ..model.continuation import continuation_hidden, continues_exactly
from ..model.mamba1 import block_input
from ..model.mamba2 import short_chunks
from ..model.placement import input_device
from ..model.sites import OutputHead, decoder_layers
from ..progress import tqdm
from .batching import (Encoded, batches, context_groups, gather_targets, head_rows, memory_items, pad_batch,
                       request_batches, target_logits, token_budget)
from .reading import choice_for, shape_of

RACE_GROUPS = 8  # context groups of a new shape read both ways, to measure which is faster


def encode_pair(tokenizer, context: str, continuation: str) -> Encoded:
    if not context:
        target = tokenizer.encode(continuation, add_special_tokens=False)
        return Encoded((tokenizer.eos_token_id, *target), len(target))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    return Encoded(tuple(whole), len(whole) - n_context)


def encode_examples(tokenizer, examples: list[Example]) -> list[Encoded]:
    """Every request of every example, example by example, choice by choice."""
    return [encode_pair(tokenizer, c, t) for e in examples for c, t in e.requests]


def target_scores(head: OutputHead, compact: torch.Tensor, encoded: list[Encoded]):
    """Summed log-prob (NaN where a logit is not finite) and all-greedy flag of each request's
    targets, from their final hidden states in the compact layout of `batching.gather_targets`."""
    logits, targets = target_logits(head, compact, encoded)
    token_logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    token_ok = torch.isfinite(logits).all(-1)
    token_greedy = (logits.argmax(-1) == targets) & token_ok
    owner = torch.arange(len(encoded), device=logits.device).repeat_interleave(
        torch.tensor([e.n_target for e in encoded], device=logits.device))

    def per_request(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(encoded), dtype=torch.float64, device=logits.device).index_add_(0, owner, values.double())

    finite = per_request((~token_ok).double()) == 0
    greedy = per_request((~token_greedy).double()) == 0
    logprob = torch.where(finite, per_request(token_logprob), torch.nan)
    return logprob.cpu().numpy(), greedy.cpu().numpy()


def shares_contexts(model, share_contexts: bool | None) -> bool:
    """Whether scoring may read shared contexts once: unless told not to (False), where that is
    exact (`continuation.continues_exactly`). True reads every shared context once; None (the
    default) reads each shape of group the way measured faster for it (`reading`)."""
    return share_contexts is not False and continues_exactly(model)


def shared_context_groups(encoded: list[Encoded]) -> list[list[int]]:
    """Requests (two or more, with a context and a target) whose context tokens are identical."""
    groups = ([i for i in g if encoded[i].n_target] for g in context_groups(encoded)
              if encoded[g[0]].context_length)
    return [g for g in groups if len(g) > 1]


def state_bytes(model) -> int:
    """Bytes of one sequence's cached state, float32: each layer's conv window and SSM state
    (Mamba-2's conv runs over x, B and C: `conv_dim` channels)."""
    total = 0
    for mixer in (block.mixer for block in decoder_layers(model)):
        conv_channels = getattr(mixer, "conv_dim", mixer.intermediate_size)
        total += 4 * (conv_channels * mixer.conv_kernel_size + mixer.intermediate_size * mixer.ssm_state_size)
    return total


def shared_hidden(model, encoded: list[Encoded], groups: list[list[int]], batch_size: int | None,
                  budget: int) -> tuple[torch.Tensor, list[int]]:
    """Final hidden states at the scored positions of the requests of some context groups, compact
    (requests x most targets x hidden), and the requests in that order (most targets first): each
    context read once (contexts of equal length in one forward), then every continuation as a block
    from its context's cached state (`continuation.continuation_hidden`)."""
    device = input_device(model)
    groups = sorted(groups, key=lambda g: encoded[g[0]].context_length)
    contexts = [encoded[g[0]].tokens[: encoded[g[0]].context_length] for g in groups]
    runs, start = [], 0
    while start < len(contexts):  # contexts of equal length, as many as a forward holds
        width = len(contexts[start])
        stop = start + 1
        while stop < len(contexts) and stop - start < (batch_size or max(1, budget // width)) \
                and len(contexts[stop]) == width:
            stop += 1
        runs.append(block_input(model, torch.tensor(contexts[start:stop], device=device), 0))
        start = stop
    rows = sorted(((i, k) for k, g in enumerate(groups) for i in g), key=lambda r: -encoded[r[0]].n_target)
    members = [i for i, _ in rows]
    tails = [encoded[i].n_target - 1 for i in members]  # inputs after the context
    ids = torch.zeros(len(members), tails[0], dtype=torch.long)
    for row, (i, tail) in enumerate(zip(members, tails)):
        ids[row, :tail] = torch.tensor(encoded[i].tokens[encoded[i].context_length: -1])
    compact = continuation_hidden(model, 0, runs, block_input(model, ids.to(device), 0), [k for _, k in rows])
    return compact, members


def chunked_target_scores(head: OutputHead, compact: torch.Tensor, items: list[Encoded], max_rows: int):
    """`target_scores` of requests sorted by most targets first, in slices whose logits fit `max_rows`."""
    step = max(1, max_rows // compact.shape[1])
    scores = [target_scores(head, compact[start: start + step, : items[start].n_target], items[start: start + step])
              for start in range(0, len(items), step)]
    return np.concatenate([lp for lp, _ in scores]), np.concatenate([g for _, g in scores])


def whole_scores(model, tokenizer, encoded: list[Encoded], requests: list[int], batch_size: int | None,
                 budget: int, head: OutputHead):
    """(requests, summed log-probs, greedy flags) of each right-padded batch of whole sequences."""
    device = input_device(model)
    for batch in request_batches([encoded[i] for i in requests], batch_size, budget):
        items = [encoded[requests[j]] for j in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        yield [requests[j] for j in batch], *target_scores(head, gather_targets(hidden, items, lengths), items)


def state_packs(packs: list[list[list[int]]], most: int):
    """The packs of groups, each split so that at most `most` requests (their cached states) are in one."""
    for pack in packs:
        part, rows = [], 0
        for group in pack:
            if part and rows + len(group) > most:
                yield part
                part, rows = [], 0
            part.append(group)
            rows += len(group)
        yield part


def shared_scores(model, encoded: list[Encoded], groups: list[list[int]], batch_size: int | None, budget: int,
                  head: OutputHead):
    """(requests, summed log-probs, greedy flags) of each pack of context groups continued together:
    as many continuation tokens as a forward holds (`batch_size` requests, or the token budget), and
    as many requests as their cached states fit the memory budget."""
    if not groups:
        return
    most = max(1, memory_items(model, state_bytes(model), 0.25))
    for pack in state_packs(batches(encoded, groups, batch_size, budget, lambda e: e.n_target), most):
        compact, members = shared_hidden(model, encoded, pack, batch_size, budget)
        yield members, *chunked_target_scores(head, compact, [encoded[i] for i in members], head_rows(model))


def measured_scores(model, tokenizer, encoded: list[Encoded], groups: list[list[int]], batch_size: int | None,
                    budget: int, head: OutputHead):
    """(requests, summed log-probs, greedy flags) of context groups, each shape read the way measured
    faster for it (`reading.choice_for`): a shape met for the first time is read both ways on its
    first `RACE_GROUPS` groups, the rest of it the faster way."""
    choice = choice_for(model, "scoring")
    by_shape: dict = {}
    for group in groups:
        by_shape.setdefault(shape_of(encoded, group), []).append(group)
    shared, whole = [], []
    for shape, members in by_shape.items():
        if shape not in choice.shared:
            sample, members = members[:RACE_GROUPS], members[RACE_GROUPS:]
            requests = [i for g in sample for i in g]
            yield from choice.race(shape, lambda: list(shared_scores(model, encoded, sample, batch_size, budget, head)),
                                   lambda: list(whole_scores(model, tokenizer, encoded, requests, batch_size, budget,
                                                             head)))
        (shared if choice.shared[shape] else whole).extend(members)
    yield from whole_scores(model, tokenizer, encoded, sorted(i for g in whole for i in g), batch_size, budget, head)
    yield from shared_scores(model, encoded, shared, batch_size, budget, head)


@torch.no_grad()
def loglikelihoods(model, tokenizer, encoded: list[Encoded], batch_size: int | None = None,
                   progress: bool = False, share_contexts: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob (NaN where logits are not finite) and greedy flag of every request.

    `share_contexts` runs a context shared by several requests once where that is exact
    (`shares_contexts`): True always, False never, None (the default) for each shape of group the
    way measured faster (`reading`); the other requests run whole. `batch_size` bounds the sequences
    of a forward (whole requests, contexts, continuations); by default the memory budget does.
    Mamba-2 on CPU scans in chunks fitted to the requests (`model.mamba2.short_chunks`)."""
    share = shares_contexts(model, share_contexts)
    groups = shared_context_groups(encoded) if share else []
    alone = sorted(set(range(len(encoded))) - {i for g in groups for i in g})
    logprob = np.full(len(encoded), np.nan)
    greedy = np.zeros(len(encoded), dtype=bool)
    head = OutputHead(model)
    longest = max(len(e.tokens) for e in encoded)
    budget = token_budget(model, longest)
    with short_chunks(model, longest), \
            tqdm(total=len(encoded), desc="scoring", unit="request", disable=not progress, leave=False) as bar:
        grouped = (measured_scores(model, tokenizer, encoded, groups, batch_size, budget, head)
                   if share_contexts is None else shared_scores(model, encoded, groups, batch_size, budget, head))
        for requests, values, flags in chain(whole_scores(model, tokenizer, encoded, alone, batch_size, budget, head),
                                             grouped):
            logprob[requests], greedy[requests] = values, flags
            bar.update(len(requests))
    return logprob, greedy


def score_examples(model, tokenizer, examples: list[Example], batch_size: int | None = None,
                   progress: bool = False, encoded: list[Encoded] | None = None) -> np.ndarray:
    """Per-example correctness of the model as it is now (steering included)."""
    encoded = encoded or encode_examples(tokenizer, examples)
    logprob, greedy = loglikelihoods(model, tokenizer, encoded, batch_size, progress)
    return correctness(examples, logprob, greedy)
