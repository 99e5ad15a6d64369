"""Perplexity on reference texts: exp of the mean next-token NLL over all tokens of all
documents, each document truncated to `max_length` tokens; and the change of perplexity between
two configurations with a per-document paired bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import torch

from .batching import Encoded, pad_batch, request_batches, token_budget
from .progress import tqdm
from .stats import bootstrap_indices


@torch.no_grad()
def document_losses(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
                    progress: bool = False) -> dict[str, list[float]]:
    """Per document (of two tokens or more): the summed next-token NLL ("nll", NaN when a logit is not
    finite) and the number of predicted tokens ("tokens"); what perplexity and its CI are made of."""
    docs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [Encoded(tuple(d), len(d) - 1) for d in docs if len(d) >= 2]
    if not encoded:
        raise ValueError("no document has two tokens or more")
    device = next(model.parameters()).device
    nll = [math.nan] * len(encoded)
    batches = request_batches(encoded, batch_size, token_budget(model, max_length))
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for row, (i, n) in enumerate(zip(batch, lengths)):
            row_logits = logits[row, :n]
            if torch.isfinite(row_logits).all():
                target = torch.tensor(encoded[i].tokens[1:], device=device)
                nll[i] = torch.nn.functional.cross_entropy(row_logits, target, reduction="sum").item()
    return {"nll": nll, "tokens": [e.n_target for e in encoded]}


def perplexity_of(losses: dict[str, list[float]]) -> float:
    """Token-weighted perplexity of `document_losses`; NaN if any document's logits are not finite."""
    nll = np.asarray(losses["nll"], float)
    return float("nan") if np.isnan(nll).any() else math.exp(nll.sum() / sum(losses["tokens"]))


def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int | None = None,
               progress: bool = False) -> float:
    """Token-weighted perplexity; NaN if any logit is not finite (reported, never averaged in)."""
    return perplexity_of(document_losses(model, tokenizer, texts, max_length, batch_size, progress))


def perplexity_change(base: dict[str, list[float]], other: dict[str, list[float]], seed: int = 0,
                      level: float = 0.95) -> dict:
    """`other`'s perplexity against `base`'s on the same documents: delta = other - base, relative =
    100 * (other / base - 1) (percent), each with its percentile CI over documents resampled with
    replacement, the same resample for both (paired). Every value None when a perplexity is NaN."""
    base_nll, other_nll = np.asarray(base["nll"], float), np.asarray(other["nll"], float)
    if np.isnan(base_nll).any() or np.isnan(other_nll).any():
        return {"delta": None, "ci95": None, "relative": None, "relative_ci95": None}
    tokens = np.asarray(base["tokens"], float)
    indices = bootstrap_indices(np.zeros(len(tokens)), seed=seed)
    resampled_tokens = tokens[indices].sum(1)
    base_ppl = np.exp(base_nll[indices].sum(1) / resampled_tokens)
    other_ppl = np.exp(other_nll[indices].sum(1) / resampled_tokens)
    base_value, other_value = perplexity_of(base), perplexity_of(other)
    alpha = (1 - level) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [round(float(v), 6) + 0.0 for v in np.quantile(values, [alpha, 1 - alpha])]

    return {"delta": round(other_value - base_value, 6) + 0.0, "ci95": interval(other_ppl - base_ppl),
            "relative": round(100 * (other_value / base_value - 1), 6) + 0.0,
            "relative_ci95": interval(100 * (other_ppl / base_ppl - 1))}


def describe_change(label: str, value: float, change: dict) -> str:
    """A perplexity and its change from the baseline with CIs, in one phrase for the console."""
    if change["delta"] is None:
        return f"{label} non-finite"
    lo, hi = change["ci95"]
    noise = ", within noise" if lo <= 0 <= hi else ""
    return (f"{label} {value:.4f} (Δ {change['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}], "
            f"{change['relative']:+.3f}% [{change['relative_ci95'][0]:+.3f}%, {change['relative_ci95'][1]:+.3f}%]"
            f"{noise})")
