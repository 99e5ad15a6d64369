"""Perplexity on reference texts: exp of the mean next-token NLL over all tokens of all
documents, each document truncated to `max_length` tokens; and the change of perplexity between
two configurations with a per-document paired bootstrap CI."""

from __future__ import annotations

import math

import torch

from ..analysis.metrics import perplexity_of
from ..model.placement import input_device
from ..progress import tqdm
from .batching import Encoded, pad_batch, request_batches, token_budget


@torch.no_grad()
def document_losses(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
                    progress: bool = False) -> dict[str, list[float]]:
    """Per document (of two tokens or more): the summed next-token NLL ("nll", NaN when a logit is not
    finite) and the number of predicted tokens ("tokens"); what perplexity and its CI are made of."""
    docs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [Encoded(tuple(d), len(d) - 1) for d in docs if len(d) >= 2]
    if not encoded:
        raise ValueError("no document has two tokens or more")
    device = input_device(model)
    nll = [math.nan] * len(encoded)
    batches = request_batches(encoded, batch_size, token_budget(model, max_length))
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for row, (i, n) in enumerate(zip(batch, lengths)):
            row_logits = logits[row, :n]
            if torch.isfinite(row_logits).all():
                target = torch.tensor(encoded[i].tokens[1:], device=logits.device)
                nll[i] = torch.nn.functional.cross_entropy(row_logits, target, reduction="sum").item()
    return {"nll": nll, "tokens": [e.n_target for e in encoded]}


def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
               progress: bool = False) -> float:
    """Token-weighted perplexity; NaN if any logit is not finite (reported, never averaged in)."""
    return perplexity_of(document_losses(model, tokenizer, texts, max_length, batch_size, progress))
