"""Each step's options: one set of defaults for the script and the library, checked the same way."""

import importlib

import pytest

from delta_steering.cli import options_of, parse_steer
from delta_steering.errors import UsageError
from delta_steering.options import (AtlasOptions, DiscoverOptions, EvaluateOptions, ExportOptions, FactorOptions,
                                    VerifyOptions)

SCRIPTS = {"step1_neuron_discovery": DiscoverOptions, "step2_steering_factor_determination": FactorOptions,
           "step3_steer_performance_verification": VerifyOptions, "delta_atlas": AtlasOptions,
           "evaluate_steered": EvaluateOptions, "export_steered_model": ExportOptions}
STEER = "20:1:2"
REQUIRED = {  # the command line's required options, and the same as Python values
    "step1_neuron_discovery": (["--save_path", "x.json"], {}),
    "delta_atlas": (["--save_path", "x.json"], {}),
    "evaluate_steered": (["--tasks", "piqa", "--steer", STEER], {"tasks": ["piqa"], "steer": [parse_steer(STEER)]}),
    "export_steered_model": (["--out", "new", "--steer", STEER], {"out": "new", "steer": [parse_steer(STEER)]}),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_without_options_runs_the_steps_defaults(script):
    """The options a script takes from a command line that names only what it requires equal the
    library's defaults, field for field."""
    argv, required = REQUIRED.get(script, ([], {}))
    args = importlib.import_module(script).build_parser().parse_args(argv)
    cls = SCRIPTS[script]
    assert options_of(cls, args).to_json() == cls(**required).to_json()


@pytest.mark.parametrize("cls, values, message", [
    (DiscoverOptions, {"validation_size": 0}, "--validation_size must be at least 1"),
    (DiscoverOptions, {"batch_size": -4}, "--batch_size must be at least 1"),
    (DiscoverOptions, {"high_impact_cut": -1.0}, "--high_impact_cut must be 0 or more"),
    (DiscoverOptions, {"method": "guess"}, "--method 'guess': use one of auto, exact, attribution"),
    (AtlasOptions, {"engine": "slow"}, "--engine 'slow': use one of fast, naive"),
    (FactorOptions, {"factors": [1.0]}, "names no steering factor other than 1"),
    (FactorOptions, {"num_examples": 1}, "--num_examples must be at least 2"),
    (VerifyOptions, {"factor": 1.0}, "--factor 1 is no steering"),
    (VerifyOptions, {"modes": ["both"]}, "mode 'both': use one of combined, cluster_ablation, layer_ablation"),
    (EvaluateOptions, {"tasks": ["piqa"]}, "give --steer"),
])
def test_bad_options_are_refused_naming_the_flag(cls, values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        cls.of(values)
