"""The analysis layer: statistics, metrics and each step's logic on plain numbers, and the figures.
Never imports torch."""

from .._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)
