"""Perplexity on reference texts: exp of the mean next-token NLL over all tokens of all
documents, each document truncated to `max_length` tokens; and the change of perplexity between
two configurations with a per-document paired bootstrap CI."""

from __future__ import annotations

from ..analysis.metrics import perplexity_of
from .batching import Encoded
from .scoring import loglikelihoods


def document_losses(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
                    progress: bool = False) -> dict[str, list[float]]:
    """Per document (of two tokens or more): the summed next-token NLL ("nll", NaN when a logit is not
    finite) and the number of predicted tokens ("tokens"); what perplexity and its CI are made of.
    A document is scored as a request whose context is its first token (the one scoring path)."""
    docs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [Encoded(tuple(d), len(d) - 1) for d in docs if len(d) >= 2]
    if not encoded:
        raise ValueError("no document has two tokens or more")
    logprob, _ = loglikelihoods(model, tokenizer, encoded, batch_size, progress, share_contexts=False)
    return {"nll": [-float(v) for v in logprob], "tokens": [e.n_target for e in encoded]}


def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
               progress: bool = False) -> float:
    """Token-weighted perplexity; NaN if any logit is not finite (reported, never averaged in)."""
    return perplexity_of(document_losses(model, tokenizer, texts, max_length, batch_size, progress))
