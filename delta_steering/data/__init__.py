"""The data layer: zero-shot tasks as lm-eval builds them and their partitions, IFEval prompts and
scoring, Pile texts. No torch, no model."""

from .._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)
