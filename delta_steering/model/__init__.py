"""The model layer: a model's SSM layers and delta sites, steering through the weights, loading, the
Mamba-1 and Mamba-2 blocks written out, continuation from a cached state, delta statistics and the
steered-checkpoint export. Imports torch; never the engine."""

from .._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)
