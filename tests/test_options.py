"""Each step's options: one set of defaults for the script and the library, checked the same way."""

import importlib

import pytest

from delta_steering.cli import options_of, parse_steer
from delta_steering.errors import UsageError
from delta_steering.options import (ENGINES, AtlasOptions, DiscoverOptions, EvaluateOptions, ExportOptions,
                                    FactorOptions, VerifyOptions)

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


def test_every_engine_named_in_the_options_is_one_the_sweep_runs():
    from delta_steering.engine.sweep import LOGLIKELIHOODS

    assert tuple(LOGLIKELIHOODS) == ENGINES


@pytest.mark.parametrize("cls", SCRIPTS.values())
@pytest.mark.parametrize("value", [0, -4])
def test_every_script_refuses_a_batch_size_below_1_the_same_way(cls, value):
    required = {"tasks": ["piqa"], "steer": [parse_steer(STEER)]} if cls is EvaluateOptions else \
        {"out": "new-folder", "steer": [parse_steer(STEER)]} if cls is ExportOptions else {}
    with pytest.raises(UsageError, match=f"--batch_size must be at least 1, got {value}"):
        cls.of({**required, "batch_size": value})
    with pytest.raises(UsageError, match="--seed must be at least 0, got -1"):
        cls.of({**required, "seed": -1})


@pytest.mark.parametrize("cls, values, message", [
    (DiscoverOptions, {"tasks": []}, "--tasks names no task"),
    (DiscoverOptions, {"tasks": ["a.jsonl", "piqa", "a.jsonl"]}, "--tasks names task a.jsonl twice"),
    (DiscoverOptions, {"tasks": ["a.jsonl", "./a.jsonl"]}, "names task ./a.jsonl twice (as a.jsonl and ./a.jsonl)"),
    (AtlasOptions, {"tasks": ["piqa", "piqa:acc_norm"]}, "names task piqa:acc_norm twice"),
    (FactorOptions, {"tasks": ["piqa", "piqa"]}, "names task piqa twice"),
    (EvaluateOptions, {"tasks": ["piqa", "piqa"], "steer": [parse_steer(STEER)]}, "names task piqa twice"),
    (FactorOptions, {"max_neurons": 5, "sample_neurons": 5}, "--max_neurons and --sample_neurons exclude each other"),
    (FactorOptions, {"sample_neurons": 0}, "--sample_neurons must be at least 1"),
    (EvaluateOptions, {"tasks": ["piqa"], "steer": [parse_steer(STEER)], "num_fewshot": -1},
     "--num_fewshot must be at least 0"),
])
def test_repeated_or_missing_tasks_and_conflicting_counts_are_refused(cls, values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls.of(values)


def test_a_task_brought_twice_by_a_group_or_two_files_of_one_name_is_refused(tmp_path):
    from delta_steering.data.tasks import load_examples

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.jsonl").write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n')
    with pytest.raises(UsageError, match="gives task t twice"):
        load_examples([str(tmp_path / "a" / "t.jsonl"), str(tmp_path / "b" / "t.jsonl")], None, "discovery", 1)
