"""Delta neuron steering for Mamba: the library behind the three step scripts.

    from delta_steering import steer
    with steer(model, layer=20, neurons=[4, 38], factor=5.0):
        out = model.generate(...)

Submodules and the public names below are imported on first use, so that a script's `--help` and
argument errors answer before torch is loaded.
"""

from __future__ import annotations

import importlib

PUBLIC = {
    "steer": "steering", "apply": "steering", "install": "steering", "SteeringHandle": "steering",
    "verify_steering_effect": "steering", "Intervention": "intervention", "Steering": "intervention",
    "NO_STEERING": "intervention", "delta_statistics": "delta_stats", "num_delta_neurons": "sites",
    "ssm_layers": "sites", "SteeringError": "errors", "UsageError": "errors",
    "load_mamba_model": "models",
}

__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    if name in PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
