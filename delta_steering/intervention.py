"""What is done to delta neurons: one concept for every engine and every step.

An `Intervention` lists neurons of one layer and, for each, either a factor (dt_pre multiplied by
it: steering, or zero ablation with factor 0) or a value (dt_pre replaced by it: mean ablation).
With no neurons it is "no steering", an intervention like any other. `edit` is the arithmetic,
applied to weight rows by `steer` and, through `dt_pre`, to cached `W_dt t` terms by the fast engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class Intervention:
    """Neurons of one layer, each scaled by its factor ("scale") or set to its value ("set")."""

    neurons: tuple[int, ...] = ()
    factors: tuple[float, ...] | None = None
    values: tuple[float, ...] | None = None

    def __post_init__(self):
        if (self.factors is None) == (self.values is None) and self.neurons:
            raise ValueError("an intervention either scales (factors) or sets (values) its neurons")
        given = self.factors if self.factors is not None else self.values
        if given is not None and len(given) != len(self.neurons):
            raise ValueError(f"{len(given)} factors or values for {len(self.neurons)} neurons")

    @classmethod
    def scale(cls, neurons: Sequence[int], factor: float | Sequence[float]) -> "Intervention":
        """dt_pre of each neuron multiplied by `factor` (one for all, or one per neuron)."""
        factors = [float(factor)] * len(neurons) if isinstance(factor, (int, float)) else [float(f) for f in factor]
        return cls(tuple(int(i) for i in neurons), factors=tuple(factors))

    @classmethod
    def set(cls, neurons: Sequence[int], values: Sequence[float]) -> "Intervention":
        """dt_pre of each neuron replaced by its value."""
        return cls(tuple(int(i) for i in neurons), values=tuple(float(v) for v in values))

    @classmethod
    def ablation(cls, kind: str, neurons: Sequence[int], dt_pre_mean: Sequence[float] | None = None) -> "Intervention":
        """Neurons removed: zero ablation (factor 0) or mean ablation (their mean dt_pre, indexed by neuron)."""
        if kind == "zero":
            return cls.scale(neurons, 0.0)
        if kind == "mean":
            if dt_pre_mean is None:
                raise ValueError("mean ablation needs the mean dt_pre of every delta neuron")
            return cls.set(neurons, [dt_pre_mean[i] for i in neurons])
        raise ValueError(f"unknown ablation {kind!r}: use one of {', '.join(ABLATIONS)}")

    @property
    def kind(self) -> str:
        return "none" if not self.neurons else "scale" if self.factors is not None else "set"

    def only(self, neurons: Sequence[int]) -> "Intervention":
        """The same intervention restricted to `neurons` (each must be one of this one's)."""
        position = {n: k for k, n in enumerate(self.neurons)}
        missing = [n for n in neurons if n not in position]
        if missing:
            raise ValueError(f"neuron {missing[0]} is not part of this intervention")
        given = self.factors if self.factors is not None else self.values
        picked = tuple(given[position[n]] for n in neurons)
        return Intervention(tuple(neurons), *((picked, None) if self.factors is not None else (None, picked)))

    def edit(self, linear: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The intervened linear term and bias of this intervention's neurons: rows of both along
        dim 0 (linear may have any trailing dims), in their own dtypes."""
        shape = (-1,) + (1,) * (linear.dim() - 1)
        if self.kind == "scale":
            factors = torch.tensor(self.factors, dtype=torch.float32, device=linear.device)
            return linear * factors.to(linear.dtype).view(shape), bias * factors.to(bias.dtype)
        if self.kind == "set":
            values = torch.tensor(self.values, dtype=torch.float32, device=bias.device)
            return torch.zeros_like(linear), values.to(bias.dtype)
        return linear, bias

    def dt_pre(self, linear: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dt_pre of this intervention's neurons before and after it, from their cached linear terms
        (neurons, ...) and biases (neurons,): `edit` as `steer` applies it to weight rows, the bias
        added in the linear term's dtype as the models add it."""
        shape = (-1,) + (1,) * (linear.dim() - 1)
        lin_after, bias_after = self.edit(linear, bias)
        return (linear + bias.float().to(linear.dtype).view(shape),
                lin_after + bias_after.float().to(linear.dtype).view(shape))


NO_STEERING = Intervention()
