"""The engine layer: forward passes over requests (batching, the reading choice, scoring), the
single-neuron sweeps, attribution, perplexity and generation."""

from .._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)
