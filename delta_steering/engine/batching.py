"""How requests become forward passes: one memory budget, one batcher (whole groups of requests,
longest first), right padding, and the gather of the positions whose next token is scored.

Mamba is causal, so right padding never reaches a scored position, and a request's scores do not
depend on which batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.placement import devices
from ..model.sites import scan_memory


@dataclass(frozen=True)
class Encoded:
    """One request as token ids: the model reads `tokens[:-1]` and predicts the last `n_target`."""

    tokens: tuple[int, ...]
    n_target: int

    @property
    def context_length(self) -> int:
        """How many tokens the model reads before the first target is predicted."""
        return len(self.tokens) - self.n_target


def context_groups(encoded: list[Encoded]) -> list[list[int]]:
    """Requests whose context tokens (all but the continuation) are identical, in first-seen order.
    Mamba is causal, so their states agree up to the last context token."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.tokens[: e.context_length], []).append(i)
    return list(groups.values())


def memory_items(model, bytes_per_item: int, cuda_share: float) -> int:
    """How many items of `bytes_per_item` fit: `cuda_share` of the free memory of the fullest GPU the
    model computes on, or 256 MiB on CPU."""
    gpus = [d for d in devices(model) if d.type == "cuda"]
    if gpus:
        free = min(torch.cuda.mem_get_info(d)[0] for d in gpus)
        return int(cuda_share * free / bytes_per_item)
    return 2**28 // bytes_per_item


def token_budget(model, max_len: int) -> int:
    """Tokens per forward pass that fit comfortably: what the SSM scans keep per token."""
    return max(max_len, memory_items(model, scan_memory(model), 0.5))


def head_rows(model) -> int:
    """Scored positions per LM head call: their logits (rows x vocab, float32) and log-softmax."""
    return max(64, memory_items(model, model.lm_head.out_features * 4 * 4, 0.25))


def batches(encoded: list[Encoded], groups: list[list[int]], batch_size: int | None,
            budget: int, width: Callable[[Encoded], int] = lambda e: len(e.tokens) - 1) -> list[list[list[int]]]:
    """Whole groups (lists of request indices) packed longest first into batches of `batch_size`
    requests, or of as many as fit `budget` tokens, padded to their first (longest) group; a
    request's tokens are `width` (by default its model inputs)."""
    widths = [max(width(encoded[i]) for i in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-widths[k], groups[k][0]))
    packed, current, n, width = [], [], 0, 0
    for k in order:
        size = n + len(groups[k])
        full = size > batch_size if batch_size else size * (width if current else widths[k]) > budget
        if current and full:
            packed.append(current)
            current, n = [], 0
        if not current:
            width = widths[k]  # the first group of a batch is its longest
        current.append(groups[k])
        n += len(groups[k])
    if current:
        packed.append(current)
    return packed


def request_batches(encoded: list[Encoded], batch_size: int | None, budget: int) -> list[list[int]]:
    """Requests on their own, longest first: `batches` with one request per group, flattened."""
    return [[g[0] for g in batch] for batch in batches(encoded, [[i] for i in range(len(encoded))], batch_size, budget)]


def pad_batch(encoded: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, list[int]]:
    """Right-padded model inputs (each sequence minus its last token) and their lengths."""
    lengths = [len(e.tokens) - 1 for e in encoded]
    ids = torch.full((len(encoded), max(lengths)), pad_id, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : lengths[row]] = torch.tensor(e.tokens[:-1])
    return ids.to(device), lengths


def gather_targets(hidden: torch.Tensor, encoded: list[Encoded], lengths: list[int]) -> torch.Tensor:
    """The final hidden states that predict each request's target tokens, compact: target k of
    request p at [p, k] (requests x most targets x hidden; the rest zero-padded)."""
    width = max(e.n_target for e in encoded)
    first = torch.tensor([n - e.n_target for e, n in zip(encoded, lengths)], device=hidden.device)
    index = (first[:, None] + torch.arange(width, device=hidden.device)).clamp_max(hidden.shape[1] - 1)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def target_mask(encoded: list[Encoded], device) -> torch.Tensor:
    """Which [request, k] entries of a compact target layout are real targets."""
    width = max(e.n_target for e in encoded)
    counts = torch.tensor([e.n_target for e in encoded], device=device)
    return torch.arange(width, device=device)[None, :] < counts[:, None]


def target_ids(encoded: list[Encoded], device) -> torch.Tensor:
    """Every request's target tokens, request after request (the order of compact[mask])."""
    return torch.tensor([t for e in encoded for t in e.tokens[-e.n_target:]], device=device)


def target_logits(head, compact: torch.Tensor, encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at the requests' target positions (float32, the LM head run on those alone, on its
    device) and the target token ids, from final hidden states in the layout of `gather_targets`."""
    logits = head(compact[target_mask(encoded, compact.device)]).float()
    return logits, target_ids(encoded, logits.device)
