"""Delta statistics: per neuron, the mean and variance of `dt_pre` and of `Delta = softplus(dt_pre)`
over every token of reference texts. The variance ranks the high-variance set; the mean is what mean
ablation sets a neuron to."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from torch import nn

from .placement import input_device
from .sites import capture_dt_pre, check_layer, num_delta_neurons


@torch.no_grad()
def delta_statistics(model: nn.Module, tokenizer, texts: Sequence[str], layer: int,
                     max_length: int = 512) -> dict[str, torch.Tensor]:
    """Per-neuron mean and variance of `dt_pre` and of `Delta = softplus(dt_pre)` over all tokens.

    Each text is run on its own (no padding), truncated to `max_length` tokens; statistics are
    accumulated in float64 over every token of every text."""
    return layer_delta_statistics(model, tokenizer, texts, [layer], max_length)[layer]


@torch.no_grad()
def layer_delta_statistics(model: nn.Module, tokenizer, texts: Sequence[str], layers: Sequence[int],
                           max_length: int = 512) -> dict[int, dict[str, torch.Tensor]]:
    """`delta_statistics` of several layers from the same forward passes (one per text)."""
    for layer in layers:
        check_layer(model, layer)
    n = num_delta_neurons(model)
    sums = {layer: {key: torch.zeros(n, dtype=torch.float64) for key in ("dt", "dt2", "delta", "delta2")}
            for layer in layers}
    count = 0
    with ExitStack() as stack:
        captured = {layer: stack.enter_context(capture_dt_pre(model, layer)) for layer in layers}
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_length]
            if ids.shape[1] == 0:
                continue
            for seen in captured.values():
                seen.clear()
            model(input_ids=ids.to(input_device(model)), use_cache=False)
            for layer in layers:
                dt = captured[layer][0].reshape(-1, n).double().cpu()
                delta = torch.nn.functional.softplus(dt)
                sums[layer]["dt"] += dt.sum(0)
                sums[layer]["dt2"] += (dt**2).sum(0)
                sums[layer]["delta"] += delta.sum(0)
                sums[layer]["delta2"] += (delta**2).sum(0)
            count += ids.shape[1]
    if count == 0:
        raise ValueError("no tokens in the reference texts")
    return {layer: _moments(sums[layer], count) for layer in layers}


def _moments(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    dt_mean, delta_mean = sums["dt"] / count, sums["delta"] / count
    return {
        "dt_pre_mean": dt_mean,
        "dt_pre_variance": (sums["dt2"] / count - dt_mean**2).clamp_min(0),
        "delta_mean": delta_mean,
        "delta_variance": (sums["delta2"] / count - delta_mean**2).clamp_min(0),
        "num_tokens": count,
    }
