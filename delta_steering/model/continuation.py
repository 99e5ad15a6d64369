"""Continuing from a cached context: a context shared by several requests (the choices of a
multiple-choice example) read once, and each request's continuation read as one block from the
state the context left, through the blocks from some layer on. Scoring uses it from the embeddings,
the fast engine from the steered output of layer L.

Exact, not an approximation: the model is causal, so the requests' states agree up to the last
context token, and the continuation carries on the same recurrence as the full-sequence scan. Mamba-1
continues in the project's own code (`mamba1.continued_block`: transformers' multi-token forward would
restart the scan at zero); Mamba-2 in transformers' chunked scan, which starts from the cached state
(`mamba2.continued_block`). The one rule (`continues_exactly`): an SSM-only family with transformers'
5.x SSM cache, in float32; in half precision the full scan rounds its state to the model's dtype
before reading it out, which a continuation from the cached float32 state does not.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import Tensor

from . import mamba1, mamba2
from .sites import SSM_ONLY_FAMILIES, decoder_layers, family_of


def has_ssm_cache(model) -> bool:
    """Whether the model is SSM-only (a fixed-size state per sequence) with transformers' 5.x SSM
    cache, whose per-layer conv window and SSM state can be read, copied and written row by row."""
    if family_of(model).name not in SSM_ONLY_FAMILIES:
        return False
    if not hasattr(transformers.cache_utils, "LinearAttentionCacheLayerMixin"):  # 5.x SSM caches
        return False
    return "cache" in inspect.signature(type(decoder_layers(model)[0]).forward).parameters


def continues_exactly(model) -> bool:
    """Whether a context read once and continued from its cached state gives the full forward's
    numbers (see the module docstring)."""
    return has_ssm_cache(model) and model.dtype == torch.float32


def blocks_from(model, start: int, hidden: Tensor, cache=None) -> Tensor:
    """Blocks start..end (the real blocks, filling `cache` when given) and the final norm."""
    for block in decoder_layers(model)[start:]:
        hidden = block(hidden, cache=cache) if cache is not None else block(hidden)
    return model.base_model.norm_f(hidden)


def merged_cache(model, caches: list) -> transformers.DynamicCache:
    """One cache holding the states of several, batch after batch (through the public Cache API)."""
    merged = transformers.DynamicCache(config=model.config)
    for layer in range(len(decoder_layers(model))):
        merged.update_conv_state(torch.cat([c.get_conv_state(layer) for c in caches]), layer)
        merged.update_recurrent_state(torch.cat([c.get_recurrent_state(layer) for c in caches]), layer)
    return merged


def read_contexts(model, start: int, contexts: list[Tensor]) -> tuple[Tensor, transformers.DynamicCache]:
    """Each batch of equal-length contexts (the residual stream entering block `start`, batch x
    tokens x hidden) through blocks start..end: the final hidden state at each context's last token
    (contexts x hidden, batch after batch) and one cache of their states."""
    lasts, caches = [], []
    for context in contexts:
        cache = transformers.DynamicCache(config=model.config)
        lasts.append(blocks_from(model, start, context, cache)[:, -1])
        caches.append(cache)
    return torch.cat(lasts), caches[0] if len(caches) == 1 else merged_cache(model, caches)


def continued(model, start: int, hidden: Tensor, cache) -> Tensor:
    """Blocks start..end and the final norm on continuations (rows x tokens x hidden, right-padded),
    row r continuing the context of cache row r. The cache is spent."""
    layers = decoder_layers(model)
    is_mamba2 = family_of(model).kind == "mamba2"
    for index in range(start, len(layers)):
        if is_mamba2:
            hidden = mamba2.continued_block(layers[index], hidden, cache)
        else:
            hidden = mamba1.continued_block(layers[index], hidden, cache.get_conv_state(index),
                                            cache.get_recurrent_state(index))
    return model.base_model.norm_f(hidden)


def continuation_hidden(model, start: int, contexts: list[Tensor], continuations: Tensor,
                        owners: list[int]) -> Tensor:
    """Final hidden states at the scored positions of requests that continue shared contexts,
    compact (rows x continuation tokens + 1 x hidden): position 0 is the context's last token, which
    predicts every first target, then the continuation's tokens. `contexts`: see `read_contexts`;
    `continuations`: the residual stream entering block `start` at each row's inputs after its
    context (rows x tokens x hidden, right-padded); `owners[r]`: the context row r continues."""
    last, cache = read_contexts(model, start, contexts)
    index = torch.tensor(owners, device=last.device)
    first = last[index][:, None]
    if not continuations.shape[1]:
        return first
    cache.reorder_cache(index)  # a state per row
    return torch.cat([first, continued(model, start, continuations, cache).to(first.dtype)], dim=1)
