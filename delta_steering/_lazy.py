"""Submodules imported on first attribute access (PEP 562), so that `import delta_steering` and a
script's `--help` answer before torch is loaded."""

from __future__ import annotations

import importlib
from typing import Callable


def submodule_getattr(package: str, public: dict[str, str] | None = None) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: a name of `public` (name -> submodule holding it), else a
    submodule of that name; an AttributeError otherwise."""
    public = public or {}

    def __getattr__(name: str) -> object:
        if name in public:
            return getattr(importlib.import_module(f"{package}.{public[name]}"), name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
