"""What is done to delta neurons: one concept for every engine and every step.

An `Intervention` lists neurons of one layer and, for each, either a factor (dt_pre multiplied by
it: steering, or zero ablation with factor 0) or a value (dt_pre replaced by it: mean ablation).
With no neurons it is "no steering", an intervention like any other. `edit` is the arithmetic,
applied to weight rows by `steer` and, through `dt_pre`, to cached `W_dt t` terms by the fast engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

ABLATIONS = ("zero", "mean")


def check_factor(value: float, where: str, ablation: bool = False) -> float:
    """A steering factor as it enters a run (command line, step file, --steer): finite and > 0, or
    0 where ablation is meant (`ablation`); the one place factors are validated."""
    factor = float(value)
    if not math.isfinite(factor):
        raise UsageError(f"{where}: factor {value!r} is not a finite number")
    if factor < 0 or factor == 0 and not ablation:
        allowed = ">= 0 (0 is zero ablation)" if ablation else "> 0 (0 would ablate the neurons, not steer them)"
        raise UsageError(f"{where}: factor {value!r} must be {allowed}")
    return factor


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
        if len(set(self.neurons)) != len(self.neurons):
            twice = sorted({n for n in self.neurons if self.neurons.count(n) > 1})
            raise UsageError(f"neuron {twice[0]} is listed twice in one intervention")

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

    def edit(self, linear: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The intervened linear term and bias of this intervention's neurons: rows of both along
        dim 0 (linear may have any trailing dims), in their own dtypes. Factors and values pass
        through float32 on the way, whatever the tensors' dtype."""
        shape = (-1,) + (1,) * (linear.dim() - 1)
        if self.kind == "scale":
            factors = bias.float().new_tensor(self.factors).to(linear.device)
            return linear * factors.to(linear.dtype).view(shape), bias * factors.to(bias.dtype)
        if self.kind == "set":
            values = bias.float().new_tensor(self.values)
            return linear.new_zeros(linear.shape), values.to(bias.dtype)
        return linear, bias

    def dt_pre(self, linear: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """dt_pre of this intervention's neurons before and after it, from their cached linear terms
        (neurons, ...) and biases (neurons,): `edit` as `steer` applies it to weight rows, the bias
        added in the linear term's dtype as the models add it."""
        lin_after, bias_after = self.edit(linear, bias)
        return with_bias(linear, bias), with_bias(lin_after, bias_after)


def with_bias(linear: Tensor, bias: Tensor, dim: int = 0) -> Tensor:
    """dt_pre from its linear term (neurons along `dim`) and bias, the bias added in the linear term's
    dtype as the models add it."""
    shape = [1] * linear.dim()
    shape[dim] = -1
    return linear + bias.float().to(linear.dtype).view(shape)


NO_STEERING = Intervention()


@dataclass(frozen=True)
class Steering:
    """An intervention at a layer: what steps 2 and 3, evaluate_steered.py and the export apply
    (no neurons: no steering, at no layer). `steering.apply` installs it."""

    layer: int | None = None
    intervention: Intervention = NO_STEERING

    @property
    def neurons(self) -> list[int]:
        return list(self.intervention.neurons)

    def describe(self) -> str:
        """For people: "x5 on 3 neurons at layer 20", "3 neurons zero-ablated at layer 20"."""
        iv = self.intervention
        if iv.kind == "none":
            return "no steering"
        count = f"{len(iv.neurons)} neuron{'s' * (len(iv.neurons) != 1)}"
        factors = sorted(set(iv.factors or ()))
        if iv.kind == "set":
            return f"{count} set to fixed values (mean ablation) at layer {self.layer}"
        if factors == [0.0]:
            return f"{count} zero-ablated at layer {self.layer}"
        return "x" + "/".join(f"{f:g}" for f in factors) + f" on {count} at layer {self.layer}"

    def to_json(self) -> dict:
        """{"layer", "neurons", "factor"} (one factor for all), or per-neuron "factors" / "values"."""
        iv = self.intervention
        record = {"layer": self.layer, "neurons": list(iv.neurons)}
        if iv.kind == "scale" and len(set(iv.factors)) == 1:
            return {**record, "factor": iv.factors[0]}
        if iv.kind != "none":
            record["factors" if iv.kind == "scale" else "values"] = list(iv.factors or iv.values)
        return record

    @classmethod
    def from_json(cls, record: dict, where: str) -> "Steering":
        """The inverse of to_json, checked: a UsageError naming `where` for anything malformed."""
        try:
            layer, neurons = record["layer"], record["neurons"]
            if not isinstance(layer, int) or not all(isinstance(n, int) and not isinstance(n, bool) for n in neurons):
                raise TypeError
            if "values" in record:
                return cls(layer, Intervention.set(neurons, record["values"]))
            factors = record["factors"] if "factors" in record else record["factor"]
            factors = [factors] * len(neurons) if isinstance(factors, (int, float)) else factors
            return cls(layer, Intervention.scale(neurons, [check_factor(f, where, ablation=True) for f in factors]))
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{where}: malformed steering record {record!r}") from None

