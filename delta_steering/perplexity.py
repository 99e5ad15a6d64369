"""Perplexity on reference texts: exp of the mean next-token NLL over all tokens of all
documents, each document truncated to `max_length` tokens."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .batching import Encoded, pad_batch, request_batches, token_budget


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
               progress: bool = False) -> float:
    """Token-weighted perplexity; NaN if any logit is not finite (reported, never averaged in)."""
    docs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [Encoded(tuple(d), len(d) - 1) for d in docs if len(d) >= 2]
    if not encoded:
        raise ValueError("no document has two tokens or more")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = request_batches(encoded, batch_size, token_budget(model, max_length))
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for row, (item, n) in enumerate(zip(items, lengths)):
            target = torch.tensor(item.tokens[1:], device=device)
            row_logits = logits[row, :n]
            if not torch.isfinite(row_logits).all():
                return float("nan")
            total_nll += torch.nn.functional.cross_entropy(row_logits, target, reduction="sum").item()
            total_tokens += n
    return math.exp(total_nll / total_tokens)
