"""Run a step script's main() in-process, as the shell would, and capture its exit status."""

import importlib
import sys


def run_main(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    saved = sys.argv
    sys.argv = [f"{module_name}.py", *map(str, argv)]
    try:
        module.main()
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = saved
    return 0


def interrupting(real, on_call: int):
    """A stand-in for `real` that raises KeyboardInterrupt on call number `on_call`, as Ctrl-C would."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return stand_in


def step1_file(path, impacts: dict[int, float], layer: int, model, n_neurons: int, tasks=(), variance=None,
               ablation: str = "zero"):
    """Write a step-1 file (format_version 1) with the given neuron impacts, as step 1 writes it: the
    records by impact, the groups by the grouping rule, a delta-variance ranking."""
    import json

    from delta_steering.artifacts import FORMAT_VERSION, impact_groups

    records = sorted(({"neuron": n, "impact": i, "measured": True} for n, i in impacts.items()),
                     key=lambda r: (-r["impact"], r["neuron"]))
    variance = variance if variance is not None else [0.0] * n_neurons
    data = {"format_version": FORMAT_VERSION, "model": str(model), "layer": layer, "tasks": [str(t) for t in tasks],
            "data_dir": None, "ablation": ablation, "all_neuron_impacts": records, "groups": impact_groups(records),
            "delta_variance": variance, "dt_pre_mean": [0.0] * n_neurons,
            "delta_variance_ranking": sorted(range(n_neurons), key=lambda k: (-variance[k], k))}
    path.write_text(json.dumps(data))
    return path
