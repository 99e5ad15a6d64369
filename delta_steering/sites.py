"""Where a model's delta neurons live: its SSM layers, each layer's `dt_pre` site in the weights, and
a hook that records `dt_pre` on every forward.

For a Mamba-1 block, `dt_pre = W_dt t + b_dt` with `t` the first `time_step_rank` outputs of
`x_proj`; delta neuron i of layer L is output channel i of `dt_proj`. Current transformers never
calls `dt_proj` as a module (it reads `dt_proj.weight` directly, as the fused CUDA kernel does), so
the site is described by the weight rows that make each channel, not by a module to hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import UsageError


@dataclass(frozen=True)
class Shape:
    """A model's layers as far as steering is concerned, known from its config alone."""

    num_layers: int
    ssm_layers: tuple[int, ...]
    delta_neurons: int  # per SSM layer


def shape_of(model_or_config) -> Shape:
    """The Shape of a model, a transformers config, or a Shape."""
    if isinstance(model_or_config, Shape):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    return Shape(config.num_hidden_layers, tuple(range(config.num_hidden_layers)), config.intermediate_size)


@dataclass
class DeltaSite:
    """The tensors whose rows make layer L's `dt_pre`, one row per delta neuron: `linear` terms
    (scaled by k to scale dt_pre by k, zeroed to set it) and the `bias` added to them."""

    linear: list[torch.Tensor]  # (neurons, ...) views into parameters
    bias: torch.Tensor  # (neurons,) view into a parameter


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of blocks of a MambaForCausalLM or MambaModel."""
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "layers", None)
    if layers is None or not hasattr(layers[0], "mixer"):
        raise UsageError(f"{type(model).__name__} is not a Mamba model (no backbone.layers[*].mixer)")
    return layers


def num_layers(model) -> int:
    return shape_of(model).num_layers


def ssm_layers(model) -> list[int]:
    """The layers that have delta neurons (every layer of a Mamba-1 model)."""
    return list(shape_of(model).ssm_layers)


def num_delta_neurons(model) -> int:
    """Delta neurons per layer: the output channels of `dt_proj` (the config's intermediate_size)."""
    return shape_of(model).delta_neurons


def check_layer(model, layer: int, what: str = "layer") -> int:
    """`layer` if the model (or config, or Shape) has it, else a UsageError naming `what` (e.g.
    "--layer") and the range."""
    n = num_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise UsageError(f"{what} {layer} out of range: the model has layers 0-{n - 1}")
    return layer


def mixer(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s SSM mixer, after checking the layer."""
    return decoder_layers(model)[check_layer(model, layer)].mixer


def check_neurons(model, neurons: Sequence[int], what: str = "neurons") -> list[int]:
    """Neuron ids as ints, each checked against the number of delta neurons per layer."""
    n = num_delta_neurons(model)
    ids = [int(i) for i in neurons]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise UsageError(f"{what}: neuron {bad[0]} out of range, the model has delta neurons 0-{n - 1}")
    return ids


def delta_site(model: nn.Module, layer: int) -> DeltaSite:
    """Layer `layer`'s `dt_proj` rows: weight (linear term) and bias."""
    projection = mixer(model, layer).dt_proj
    return DeltaSite([projection.weight], projection.bias)


@contextmanager
def capture_dt_pre(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Record `dt_pre = W_dt t + b_dt` (batch x tokens x neurons) of layer `layer` on each forward.

    `x_proj` is called as a module, so a hook on it sees `t` (its first `time_step_rank` outputs);
    dt_pre is recomputed from the current `dt_proj` weights, steering included."""
    block = mixer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        time_step = output[..., : block.time_step_rank]
        captured.append(torch.nn.functional.linear(time_step, block.dt_proj.weight, block.dt_proj.bias))

    handle = block.x_proj.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
