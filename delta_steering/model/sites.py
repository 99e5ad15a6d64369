"""Where a model's delta neurons live, for every selective-SSM family in transformers: its SSM layers,
each layer's `dt_pre` site in the weights, a hook that records `dt_pre`, and the output head.

Every family computes `Delta = softplus(dt_pre)` with `dt_pre` linear in the layer's input:

| kind | families | dt_pre | a delta neuron |
|---|---|---|---|
| mamba1 | mamba, falcon_mamba, jamba | `W_dt t + b_dt` (`mixer.dt_proj`) | an output channel of dt_proj |
| zamba | zamba | per head h: `W_dt[h] t[h] + b_dt[h]` (bare `dt_proj_weight`/`dt_proj_bias`) | a (head, channel) pair, numbered head-major |
| mamba2 | mamba2, bamba, zamba2, nemotron_h, granitemoehybrid, falcon_h1 | the last `num_heads` outputs of `in_proj` (+ its bias) + `dt_bias` | a head |

transformers never calls `dt_proj` as a module (it reads its weight directly, as the fused kernels
do), so a site is described by the rows of the tensors whose linear terms make each channel
(`linear`) and the bias added to them (`bias`): scaling both rows by k scales that channel of
`dt_pre` by k on every code path. Multipliers that some families apply on the way (falcon_h1's
`ssm_in_multiplier` and `mup_vector`) are linear, so the same edit stays exact. Hybrids interleave
SSM layers with attention: `config.layer_types[i]` is "linear_attention" or "hybrid" on SSM layers.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import UsageError
from .placement import weight

SSM_LAYER_TYPES = ("linear_attention", "hybrid")


@dataclass(frozen=True)
class Family:
    """One selective-SSM architecture of transformers: how to reach its SSM mixers and their delta site."""

    name: str  # the config's model_type
    kind: str  # "mamba1", "zamba" or "mamba2"
    mixer_paths: tuple[str, ...]  # attribute paths tried on each decoder layer
    capture: str  # the module whose forward hook sees dt_pre's input: "x_proj", "dt_layernorm", "in_proj" or "scan"
    neuron: str  # what one delta neuron is, for people

    @property
    def modeling(self):
        return importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")


_M1, _ZAMBA, _M2 = ("an output channel of dt_proj", "a (head, channel) pair of dt_proj_weight, head-major",
                    "a head: its row of in_proj's dt slice and its dt_bias")
FAMILIES = {f.name: f for f in (
    Family("mamba", "mamba1", ("mixer",), "x_proj", _M1),
    Family("falcon_mamba", "mamba1", ("mixer",), "dt_layernorm", _M1),
    Family("jamba", "mamba1", ("mamba",), "dt_layernorm", _M1),
    Family("zamba", "zamba", ("mamba", "mamba_decoder.mamba"), "scan", _ZAMBA),
    Family("mamba2", "mamba2", ("mixer",), "in_proj", _M2),
    Family("bamba", "mamba2", ("mamba",), "in_proj", _M2),
    Family("zamba2", "mamba2", ("mamba", "mamba_decoder.mamba"), "in_proj", _M2),
    Family("nemotron_h", "mamba2", ("mixer",), "in_proj", _M2),
    Family("granitemoehybrid", "mamba2", ("mamba",), "in_proj", _M2),
    Family("falcon_h1", "mamba2", ("mamba",), "in_proj", _M2),
)}


SSM_ONLY_FAMILIES = ("mamba", "falcon_mamba", "mamba2")  # every block a norm, an SSM mixer and a residual


def family_of(model_or_config) -> Family:
    """The family of a model or config, or a UsageError naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} has no delta neurons this tool knows; supported: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Shape:
    """A model's layers as far as steering is concerned, known from its config alone."""

    num_layers: int
    ssm_layers: tuple[int, ...]
    delta_neurons: int  # per SSM layer
    layer_types: tuple[str, ...] = ()


@dataclass
class DeltaSite:
    """The tensors whose rows make layer L's `dt_pre`, one row per delta neuron: `linear` terms
    (scaled by k to scale dt_pre by k, zeroed to set it) and the `bias` added to them."""

    linear: list[torch.Tensor]  # (neurons, ...) views into parameters
    bias: torch.Tensor  # (neurons,) view into a parameter


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (or of its base model)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UsageError(f"{type(model).__name__} has no decoder layers (base_model.layers)")
    return layers


def _attribute(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layer_types(model_or_config) -> tuple[str, ...]:
    config = getattr(model_or_config, "config", model_or_config)
    return tuple(config.layer_types)


def meta_model(config) -> nn.Module:
    """The model of `config` with no weights (on the meta device): its structure, for free."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shape_of(model_or_config) -> Shape:
    """The Shape of a model, a transformers config, or a Shape."""
    if isinstance(model_or_config, Shape):
        return model_or_config
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(model_or_config)
    return _shape(model)


def _shape(model: nn.Module) -> Shape:
    family_of(model)
    types = layer_types(model)
    ssm = tuple(i for i, t in enumerate(types) if t in SSM_LAYER_TYPES)
    if not ssm:
        raise UsageError(f"{type(model).__name__} has no SSM layer")
    return Shape(len(types), ssm, _site_rows(model, ssm[0]), types)


def ssm_layers(model) -> list[int]:
    """The layers that have delta neurons."""
    return list(shape_of(model).ssm_layers)


def num_delta_neurons(model) -> int:
    """Delta neurons per SSM layer."""
    return shape_of(model).delta_neurons


def check_layer(model, layer: int, what: str = "layer") -> int:
    """`layer` if it is an SSM layer of the model (or config, or Shape), else a UsageError naming
    `what` (e.g. "--layer") and the SSM layers."""
    shape = shape_of(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < shape.num_layers:
        raise UsageError(f"{what} {layer} out of range: the model has layers 0-{shape.num_layers - 1}")
    if layer not in shape.ssm_layers:
        raise UsageError(f"{what} {layer} is not an SSM layer ({shape.layer_types[layer]}); the SSM layers are "
                         f"{', '.join(map(str, shape.ssm_layers))}")
    return layer


def check_neurons(model, neurons: Sequence[int], what: str = "neurons") -> list[int]:
    """Neuron ids as ints, each checked against the number of delta neurons per layer."""
    n = num_delta_neurons(model)
    ids = [int(i) for i in neurons]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise UsageError(f"{what}: neuron {bad[0]} out of range, the model has delta neurons 0-{n - 1}")
    return ids


def mixer(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s SSM mixer, after checking that it is an SSM layer."""
    check_layer(model, layer)
    block = decoder_layers(model)[layer]
    for path in family_of(model).mixer_paths:
        found = _attribute(block, path)
        if found is not None and any(hasattr(found, a) for a in ("dt_proj", "dt_proj_bias", "dt_bias")):
            return found
    raise UsageError(f"layer {layer} of {type(model).__name__} has no SSM mixer")


def _mixer_unchecked(model: nn.Module, layer: int) -> nn.Module:
    block = decoder_layers(model)[layer]
    return next(_attribute(block, p) for p in family_of(model).mixer_paths if _attribute(block, p) is not None)


def _site_of(block: nn.Module, kind: str, read: Callable[[nn.Module, str], torch.Tensor] = getattr) -> DeltaSite:
    """A mixer's delta site, its tensors read with `read(module, name)`: the parameters themselves by
    default; steering reads them through `placement.pin`, so that offloaded ones are edited where the
    forward reads them."""
    if kind == "mamba1":
        return DeltaSite([read(block.dt_proj, "weight")], read(block.dt_proj, "bias"))
    if kind == "zamba":
        linear, bias = read(block, "dt_proj_weight"), read(block, "dt_proj_bias")
        heads, head_dim, rank = linear.shape
        return DeltaSite([linear.view(heads * head_dim, rank)], bias.view(heads * head_dim))
    heads = block.num_heads  # in_proj's outputs are [gate | xBC | dt]: the dt slice is the last `heads`
    linear = [read(block.in_proj, "weight")[-heads:]]
    if block.in_proj.bias is not None:
        linear.append(read(block.in_proj, "bias")[-heads:])
    return DeltaSite(linear, read(block, "dt_bias"))


def _site_rows(model: nn.Module, layer: int) -> int:
    return _site_of(_mixer_unchecked(model, layer), family_of(model).kind).bias.shape[0]


def delta_site(model: nn.Module, layer: int, read: Callable[[nn.Module, str], torch.Tensor] = getattr) -> DeltaSite:
    """Layer `layer`'s delta site: the rows to edit (its tensors read with `read`, see `_site_of`)."""
    return _site_of(mixer(model, layer), family_of(model).kind, read)


@contextmanager
def capture_dt_pre(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Record `dt_pre` (batch x tokens x neurons) of layer `layer` on each full-sequence forward,
    recomputed from the current weights (steering included) at a module that every path calls:
    `x_proj` (mamba), `dt_layernorm` (falcon_mamba, jamba), `in_proj` (Mamba-2 families), or the
    scan function's entry (zamba, whose projections are bare parameters)."""
    block, fam = mixer(model, layer), family_of(model)
    captured: list[torch.Tensor] = []
    if fam.capture == "scan":
        with _zamba_scan_entries(model, block, captured.append):
            yield captured
        return

    def record(output: torch.Tensor) -> None:  # the weights as this forward sees them (`placement.weight`)
        if fam.kind == "mamba1":
            time_step = output[..., : block.time_step_rank] if fam.capture == "x_proj" else output
            captured.append(torch.nn.functional.linear(time_step, weight(block.dt_proj, "weight"),
                                                       weight(block.dt_proj, "bias")))
        else:
            dt = output[..., -block.num_heads:]
            multiplier = getattr(block, "mup_vector", None)  # falcon_h1 scales in_proj's output
            dt = dt if multiplier is None else dt * multiplier[..., -block.num_heads:]
            captured.append(dt + weight(block, "dt_bias"))

    handle = getattr(block, fam.capture).register_forward_hook(lambda _m, _i, output: record(output))
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def _zamba_scan_entries(model: nn.Module, block: nn.Module, observe: Callable[[torch.Tensor], None]):
    """While `block` runs, observe dt_pre where zamba's per-head scan function is entered, the heads
    concatenated in neuron order (batch x tokens x neurons)."""
    module = family_of(model).modeling
    original = module.mamba_selective_scan
    heads: list[torch.Tensor] = []
    active = {"on": False}

    @functools.wraps(original)
    def scan(hidden_states, dt, *args, delta_bias=None, **kwargs):
        if active["on"]:
            pre = dt + (delta_bias.to(dt.dtype)[..., None] if delta_bias is not None else 0)
            heads.append(pre.transpose(1, 2))
            if len(heads) == block.n_mamba_heads:
                observe(torch.cat(heads, dim=-1))
                heads.clear()
        return original(hidden_states, dt, *args, delta_bias=delta_bias, **kwargs)

    hooks = [block.register_forward_pre_hook(lambda *_: active.update(on=True)),
             block.register_forward_hook(lambda *_: active.update(on=False))]
    module.mamba_selective_scan = scan
    try:
        yield
    finally:
        module.mamba_selective_scan = original
        for hook in hooks:
            hook.remove()


class OutputHead:
    """The LM head as the family's causal LM applies it: logits = lm_head(hidden) times the family's
    output multiplier (falcon_h1's lm_head_multiplier, granitemoehybrid's 1 / logits_scaling)."""

    def __init__(self, model: nn.Module):
        self.lm_head = model.lm_head
        fam = family_of(model)
        self.scale = (model.base_model.lm_head_multiplier if fam.name == "falcon_h1"
                      else 1.0 / model.config.logits_scaling if fam.name == "granitemoehybrid" else 1.0)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return logits if self.scale == 1.0 else logits * self.scale


def scan_memory(model: nn.Module) -> int:
    """Bytes per token that a forward's SSM scans keep: two (channels x state) float32 tensors
    per SSM layer, with headroom."""
    block = _mixer_unchecked(model, ssm_layers(model)[0])
    return 2 * block.intermediate_size * block.ssm_state_size * 4 * 3
