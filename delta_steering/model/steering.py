"""Delta-neuron steering through the weights: a removable handle that edits the rows of a layer's
delta site in place.

Scaling output channel i of `dt_pre = W t + b` by k is exactly scaling row i of W and entry i of b
by k, so steering edits those rows and every code path (slow scan, fused kernel, cached
token-by-token generation) sees it, where a forward hook on `dt_proj` would never fire. Setting a
channel to a constant m (mean ablation) is row 0, bias m. The untouched rows are kept and restored
bit for bit when the last handle is removed. A site whose weights accelerate offloaded to the CPU
or disk is edited in an in-memory copy that the layer's forward reads instead (`placement.pin`),
dropped again when the last handle is removed.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Sequence

import torch
from torch import nn

from ..errors import SteeringError, UsageError
from ..intervention import Intervention, Steering
from . import placement
from .sites import check_layer, check_neurons, decoder_layers, delta_site, num_delta_neurons


class _SteeredSite:
    """The pristine rows of one layer's delta site and the interventions active on it, in install order."""

    ATTR = "_delta_steering_state"

    def __init__(self, model: nn.Module, layer: int):
        self.owner = decoder_layers(model)[layer]
        self.pins: list[tuple[nn.Module, str]] = []
        self.site = delta_site(model, layer, self._pin)
        self.pristine = [t.detach().clone() for t in (*self.site.linear, self.site.bias)]
        self.active: list[Intervention] = []

    def _pin(self, module: nn.Module, name: str) -> torch.Tensor:
        """The tensor the forward reads (an offloaded one copied to memory, see placement.pin)."""
        self.pins.append((module, name))
        return placement.pin(module, name)

    @classmethod
    def of(cls, model: nn.Module, layer: int) -> "_SteeredSite":
        owner = decoder_layers(model)[layer]
        state = owner.__dict__.get(cls.ATTR)
        if state is None:
            state = cls(model, layer)
            owner.__dict__[cls.ATTR] = state  # a plain attribute: state_dict() is unchanged
        return state

    @torch.no_grad()
    def refresh(self) -> None:
        """Rewrite the site as the pristine rows with every active intervention applied in turn."""
        tensors = [*self.site.linear, self.site.bias]
        for tensor, pristine in zip(tensors, self.pristine):
            tensor.copy_(pristine)
        for intervention in self.active:
            rows = torch.tensor(intervention.neurons, dtype=torch.long, device=self.site.bias.device)
            bias = self.site.bias[rows]
            for linear in self.site.linear:
                linear[rows], edited_bias = intervention.edit(linear[rows], bias)
            self.site.bias[rows] = edited_bias
        if not self.active:
            for module, name in self.pins:
                placement.unpin(module, name)
            del self.owner.__dict__[self.ATTR]


class SteeringHandle:
    """A removable intervention on one layer's delta neurons; also a context manager."""

    def __init__(self, state: _SteeredSite | None, intervention: Intervention, layer: int | None):
        self._state, self.intervention, self.layer = state, intervention, layer
        self.neurons = list(intervention.neurons)

    def remove(self) -> None:
        if self._state is not None and self.intervention in self._state.active:
            self._state.active.remove(self.intervention)
            self._state.refresh()

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install(model: nn.Module, layer: int, intervention: Intervention) -> SteeringHandle:
    """Apply `intervention` to layer `layer` until the returned handle is removed. No steering (an
    intervention without neurons) touches nothing and needs no layer."""
    if not intervention.neurons:
        return SteeringHandle(None, intervention, layer)
    check_layer(model, layer)
    check_neurons(model, intervention.neurons)
    state = _SteeredSite.of(model, layer)
    state.active.append(intervention)
    state.refresh()
    return SteeringHandle(state, intervention, layer)


def apply(model: nn.Module, steerings: Steering | Sequence[Steering]) -> ExitStack:
    """Install every steering (layer + intervention) together; closing the returned stack (or leaving
    its `with` block) removes them all."""
    stack = ExitStack()
    for steering in [steerings] if isinstance(steerings, Steering) else steerings:
        stack.enter_context(install(model, steering.layer, steering.intervention))
    return stack


def steer(model: nn.Module, layer: int, neurons: Sequence[int], factor: float | Sequence[float] = 0.0,
          mode: str = "scale", means: Sequence[float] | torch.Tensor | None = None) -> SteeringHandle:
    """Multiply delta neurons `neurons` of layer `layer` by `factor` (one, or one per neuron), or with
    mode="mean" replace them by `means` (one per neuron, or one per delta neuron of the layer).
    Use as `with steer(...):` or keep the handle and call `.remove()`."""
    if mode == "scale":
        return install(model, layer, Intervention.scale(neurons, factor))
    if mode == "mean":
        return install(model, layer, Intervention.set(neurons, _mean_values(model, neurons, means)))
    raise ValueError(f'unknown steering mode {mode!r}: use "scale" or "mean"')


def _mean_values(model: nn.Module, neurons: Sequence[int], means) -> list[float]:
    """One value per neuron from `means` given per neuron or per delta neuron of the layer."""
    if means is None:
        raise ValueError('mean ablation needs means= (one value per neuron, or one per delta neuron)')
    values = [float(v) for v in torch.as_tensor(means, dtype=torch.float32).flatten()]
    if len(values) == num_delta_neurons(model):
        values = [values[i] for i in check_neurons(model, neurons)]
    if len(values) != len(neurons):
        raise ValueError(f"{len(values)} means for {len(neurons)} neurons")
    return values


def _probe_input(model: nn.Module, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, length), generator=generator)


@torch.no_grad()
def layer_output(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states after block `layer` (the residual stream that block writes)."""
    out = model(input_ids=input_ids.to(placement.input_device(model)), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1].float()


def verify_steering_effect(model: nn.Module, steerings: Steering | Sequence[Steering]) -> float:
    """Check once per run, with the run's own intervention(s) installed together, that they change
    the model's output on a probe input. Returns the largest absolute change of the last steered
    layer's output; raises SteeringError if there is none (a hook that never fires, a no-op edit)."""
    steerings = [steerings] if isinstance(steerings, Steering) else list(steerings)
    steerings = [s for s in steerings if s.intervention.neurons]
    if not steerings:
        return 0.0
    layer = max(s.layer for s in steerings)
    probe = _probe_input(model)
    before = layer_output(model, layer, probe)
    if not torch.isfinite(before).all():
        check_finite_outputs(model)
    with apply(model, steerings):
        after = layer_output(model, layer, probe)
    change = (after - before).abs().max().item()
    described = "; ".join(s.describe() for s in steerings)
    if not math.isfinite(change):
        raise UsageError(f"the factor drives the model's outputs to non-finite values: steering ({described}) makes "
                         f"layer {layer}'s output on a probe input NaN or inf; use a smaller factor")
    if not change > 0:
        raise SteeringError(f"steering ({described}) did not change the model's output on a probe input (max "
                            f"change {change}); the intervention is not reaching the model")
    return change


@torch.no_grad()
def check_finite_outputs(model: nn.Module) -> None:
    """Before any measurement: refuse (one line) a model whose own, unsteered outputs on a probe input
    are not finite, naming the first parameter that holds NaN or inf (else the dtype is to blame)."""
    hidden = model(input_ids=_probe_input(model).to(placement.input_device(model)), output_hidden_states=True,
                   use_cache=False).hidden_states
    if all(torch.isfinite(h).all() for h in hidden):
        return
    bad = next((name for name, p in model.named_parameters()
                if p.device.type != "meta" and not torch.isfinite(p).all()), None)
    cause = f"its parameter {bad} holds NaN or inf" if bad else "every weight is finite: try --dtype float32"
    raise UsageError(f"the baseline's outputs are not finite: the unsteered model's hidden states on a probe input "
                     f"hold NaN or inf ({cause})")
