"""The steps: each step of the method run on a loaded model."""

from .._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)
