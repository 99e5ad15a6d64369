"""Run a step script's main() in-process, as the shell would, and capture its exit status."""

import importlib
import sys
from pathlib import Path


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


def one_line(capsys) -> str:
    """The one line a bad input gets on stderr (no traceback): the test fails on anything else."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


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
    """Write a step-1 file with the given neuron impacts, as step 1 writes it (through the Discovery
    contract): the records by impact, the groups by the grouping rule. `model` is a model directory
    (its provenance is then real) or any name (a placeholder digest and family)."""
    from delta_steering.artifacts import Discovery, Provenance, impact_groups
    from delta_steering.model.loading import check_model_source
    from delta_steering.results_io import write_json

    records = sorted(({"neuron": n, "impact": i, "measured": True} for n, i in impacts.items()),
                     key=lambda r: (-r["impact"], r["neuron"]))
    variance = variance if variance is not None else [0.0] * n_neurons
    provenance = Provenance.of(check_model_source(str(model)), layer) if Path(str(model)).is_dir() else \
        Provenance(str(model), "0" * 64, "mamba", layer)
    discovery = Discovery(provenance, tasks=[str(t) for t in tasks], ablation=ablation, records=records,
                          groups=impact_groups(records), delta_variance=list(variance), dt_pre_mean=[0.0] * n_neurons)
    write_json(path, discovery.to_json())
    return path


def step2_file(path, step1_path, high_impact: list[int], optimal: dict, layer: int | None = None):
    """Write a step-2 file as step 2 writes it (through the Factors contract), made from the step-1
    file `step1_path`: its model and layer (or `layer`), the High Impact group and `optimal` factors."""
    from dataclasses import replace

    from delta_steering.artifacts import Factors, read_discovery
    from delta_steering.results_io import write_json

    step1 = read_discovery(step1_path)
    provenance = replace(step1.provenance, layer=step1.layer if layer is None else layer,
                         inputs={"step1_file": {"path": str(step1_path), "sha256": step1.sha256}})
    factors = Factors(provenance, groups={"high_impact": {"neurons": high_impact}, "neutral": {"neurons": []}},
                      optimal=optimal)
    write_json(path, factors.to_json())
    return path
