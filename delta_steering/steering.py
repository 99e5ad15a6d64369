"""Delta-neuron steering through the weights of `dt_proj` (SPEC §2).

Current transformers never calls `mixer.dt_proj(...)`: it reads `dt_proj.weight` and `dt_proj.bias`
directly (and so does the fused CUDA kernel). A forward hook on `dt_proj` therefore never fires.
Scaling output channel i of `dt_pre = W t + b` by k is exactly scaling row i of W and entry i of b
by k, so steering edits those rows in place and every code path (slow scan, fused kernel, cached
token-by-token generation) sees it. Replacing a channel by a constant m (mean ablation) is row 0,
bias m. The untouched weights are kept and restored bit for bit when the last handle is removed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


class SteeringError(RuntimeError):
    """An installed intervention did not change the model (it would silently measure nothing)."""


def mamba_layers(model: nn.Module) -> nn.ModuleList:
    """The list of Mamba blocks of a MambaForCausalLM or MambaModel."""
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "layers", None)
    if layers is None or not hasattr(layers[0], "mixer"):
        raise ValueError(f"{type(model).__name__} is not a Mamba model (no backbone.layers[*].mixer)")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(mamba_layers(model))


def num_delta_neurons(model: nn.Module) -> int:
    """Number of output channels of `dt_proj` (the config's intermediate_size)."""
    return mamba_layers(model)[0].mixer.dt_proj.out_features


def dt_proj(model: nn.Module, layer: int) -> nn.Linear:
    """Layer `layer`'s time-step projection, after checking the layer index."""
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has layers 0-{n - 1}")
    return mamba_layers(model)[layer].mixer.dt_proj


def check_neurons(model: nn.Module, neurons: Sequence[int]) -> list[int]:
    """Neuron ids as ints, each checked against the number of delta neurons."""
    n = num_delta_neurons(model)
    ids = [int(i) for i in neurons]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"neuron {bad[0]} out of range: valid delta neurons are 0-{n - 1}")
    return ids


class _Intervention:
    """One edit of some channels: scale them by factors, or set them to constants (mean ablation)."""

    def __init__(self, rows: torch.Tensor, factors: torch.Tensor | None, means: torch.Tensor | None):
        self.rows, self.factors, self.means = rows, factors, means

    def apply(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if self.means is None:
            weight[self.rows] *= self.factors[:, None].to(weight.dtype)
            bias[self.rows] *= self.factors.to(bias.dtype)
        else:
            weight[self.rows] = 0
            bias[self.rows] = self.means.to(bias.dtype)


class _SteeredProjection:
    """The pristine weights of one `dt_proj` and the interventions active on it, in install order."""

    ATTR = "_delta_steering_state"

    def __init__(self, module: nn.Linear):
        self.module = module
        self.weight = module.weight.detach().clone()
        self.bias = module.bias.detach().clone()
        self.active: list[_Intervention] = []

    @classmethod
    def of(cls, module: nn.Linear) -> "_SteeredProjection":
        state = module.__dict__.get(cls.ATTR)
        if state is None:
            state = cls(module)
            module.__dict__[cls.ATTR] = state  # a plain attribute: state_dict() is unchanged
        return state

    @torch.no_grad()
    def refresh(self) -> None:
        """Rewrite the module's weights as the pristine ones with every active intervention applied."""
        weight, bias = self.module.weight, self.module.bias
        weight.copy_(self.weight)
        bias.copy_(self.bias)
        for intervention in self.active:
            intervention.apply(weight, bias)
        if not self.active:
            del self.module.__dict__[self.ATTR]


class SteeringHandle:
    """A removable intervention on one layer's delta neurons; also a context manager."""

    def __init__(self, projection: _SteeredProjection, intervention: _Intervention, layer: int):
        self._projection, self._intervention, self.layer = projection, intervention, layer
        self.neurons = intervention.rows.tolist()

    def remove(self) -> None:
        if self._intervention in self._projection.active:
            self._projection.active.remove(self._intervention)
            self._projection.refresh()

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def steer(
    model: nn.Module,
    layer: int,
    neurons: Sequence[int],
    factor: float | Sequence[float] = 0.0,
    mode: str = "scale",
    means: Sequence[float] | torch.Tensor | None = None,
) -> SteeringHandle:
    """Multiply delta neurons `neurons` of layer `layer` by `factor` (mode "scale"), or replace them
    by `means` (mode "mean"). Use as `with steer(...):` or keep the handle and call `.remove()`."""
    module = dt_proj(model, layer)
    ids = check_neurons(model, neurons)
    rows = torch.tensor(ids, dtype=torch.long, device=module.weight.device)
    if mode == "scale":
        factors = torch.as_tensor(factor, dtype=torch.float32).flatten()
        if factors.numel() == 1:
            factors = factors.expand(len(ids))
        if factors.numel() != len(ids):
            raise ValueError(f"{factors.numel()} factors for {len(ids)} neurons")
        intervention = _Intervention(rows, factors.to(module.weight.device), None)
    elif mode == "mean":
        if means is None:
            raise ValueError('mode="mean" needs means= (one value per neuron, or one per delta neuron)')
        values = torch.as_tensor(means, dtype=torch.float32).flatten().to(module.weight.device)
        if values.numel() == num_delta_neurons(model):
            values = values[rows]
        if values.numel() != len(ids):
            raise ValueError(f"{values.numel()} means for {len(ids)} neurons")
        intervention = _Intervention(rows, None, values)
    else:
        raise ValueError(f'unknown steering mode {mode!r}: use "scale" or "mean"')
    projection = _SteeredProjection.of(module)
    projection.active.append(intervention)
    projection.refresh()
    return SteeringHandle(projection, intervention, layer)


def ablate(model: nn.Module, layer: int, neurons: Sequence[int], ablation: str = "zero",
           means: Sequence[float] | torch.Tensor | None = None) -> SteeringHandle:
    """Remove neurons: zero ablation (factor 0) or mean ablation (their mean `dt_pre`)."""
    if ablation == "zero":
        return steer(model, layer, neurons, 0.0)
    if ablation == "mean":
        return steer(model, layer, neurons, mode="mean", means=means)
    raise ValueError(f'unknown ablation {ablation!r}: use "zero" or "mean"')


def _probe_input(model: nn.Module, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, length), generator=generator)


@torch.no_grad()
def layer_output(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states after block `layer` (the residual stream that block writes)."""
    out = model(input_ids=input_ids.to(model.device), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1].float()


def verify_steering_effect(
    model: nn.Module,
    layer: int,
    neurons: Sequence[int],
    intervention: Callable[[], SteeringHandle] | None = None,
) -> float:
    """Check once per run that an intervention changes layer `layer`'s output on a probe input.

    By default the intervention is zero-ablation of `neurons`. Returns the largest absolute change;
    raises SteeringError if there is none (a hook that never fires, a no-op edit)."""
    if not len(neurons):
        return 0.0
    intervention = intervention or (lambda: steer(model, layer, neurons, 0.0))
    probe = _probe_input(model)
    before = layer_output(model, layer, probe)
    with intervention():
        after = layer_output(model, layer, probe)
    change = (after - before).abs().max().item()
    if not change > 0 or not math.isfinite(change):
        raise SteeringError(
            f"steering delta neurons {list(neurons)[:5]}... of layer {layer} did not change the layer's "
            f"output on a probe input (max change {change}); the intervention is not reaching the model")
    return change


@contextmanager
def capture_dt_pre(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Record `dt_pre = W_dt t + b_dt` (batch x tokens x neurons) of layer `layer` on each forward.

    `x_proj` is called as a module, so a hook on it sees `t` (its first `time_step_rank` outputs);
    dt_pre is recomputed from the current `dt_proj` weights, steering included."""
    mixer = mamba_layers(model)[layer].mixer
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        time_step = output[..., : mixer.time_step_rank]
        captured.append(torch.nn.functional.linear(time_step, mixer.dt_proj.weight, mixer.dt_proj.bias))

    handle = mixer.x_proj.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def delta_statistics(model: nn.Module, tokenizer, texts: Sequence[str], layer: int,
                     max_length: int = 512) -> dict[str, torch.Tensor]:
    """Per-neuron mean and variance of `dt_pre` and of `Delta = softplus(dt_pre)` over all tokens.

    Each text is run on its own (no padding), truncated to `max_length` tokens; statistics are
    accumulated in float64 over every token of every text."""
    dt_proj(model, layer)
    n = num_delta_neurons(model)
    sums = {key: torch.zeros(n, dtype=torch.float64) for key in ("dt", "dt2", "delta", "delta2")}
    count = 0
    with capture_dt_pre(model, layer) as captured:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_length]
            if ids.shape[1] == 0:
                continue
            captured.clear()
            model(input_ids=ids.to(model.device), use_cache=False)
            dt = captured[0].reshape(-1, n).double().cpu()
            delta = torch.nn.functional.softplus(dt)
            sums["dt"] += dt.sum(0)
            sums["dt2"] += (dt**2).sum(0)
            sums["delta"] += delta.sum(0)
            sums["delta2"] += (delta**2).sum(0)
            count += dt.shape[0]
    if count == 0:
        raise ValueError("no tokens in the reference texts")
    dt_mean, delta_mean = sums["dt"] / count, sums["delta"] / count
    return {
        "dt_pre_mean": dt_mean,
        "dt_pre_variance": (sums["dt2"] / count - dt_mean**2).clamp_min(0),
        "delta_mean": delta_mean,
        "delta_variance": (sums["delta2"] / count - delta_mean**2).clamp_min(0),
        "num_tokens": count,
    }
