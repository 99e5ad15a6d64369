"""Delta neuron steering for Mamba: the library behind the three step scripts.

    import delta_steering as ds
    with ds.steer(model, layer=20, neurons=[4, 38], factor=5.0):
        out = model.generate(...)
    discovery = ds.discover(model, tokenizer, tasks=["piqa"], layer=20, neurons=list(range(16)))
    factors = ds.determine_factors(model, tokenizer, discovery, factors=[2.0, 5.0])
    verification = ds.verify(model, tokenizer, discovery, factors, modes=["combined"])

The package is in layers (`model`, `data`, `engine`, `analysis`, `steps`) over a small root of
contracts and plumbing. Submodules and the public names below are imported on first use, so that
a script's `--help` and argument errors answer before torch is loaded.
"""

from __future__ import annotations

from ._lazy import submodule_getattr

PUBLIC = {
    "discover": "steps.discover", "determine_factors": "steps.determine_factors", "verify": "steps.verify",
    "atlas": "steps.atlas", "evaluate": "steps.evaluate", "export": "steps.export",
    "Discovery": "artifacts", "Factors": "artifacts", "Results": "artifacts", "Verification": "artifacts",
    "steer": "model.steering", "apply": "model.steering", "install": "model.steering",
    "SteeringHandle": "model.steering", "verify_steering_effect": "model.steering", "Intervention": "intervention",
    "Steering": "intervention", "NO_STEERING": "intervention", "delta_statistics": "model.delta_stats",
    "num_delta_neurons": "model.sites", "ssm_layers": "model.sites", "SteeringError": "errors",
    "UsageError": "errors", "load_mamba_model": "model.loading", "load_model": "model.loading",
}

__all__ = sorted(PUBLIC)
__getattr__ = submodule_getattr(__name__, PUBLIC)
