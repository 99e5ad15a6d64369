"""Smoke test of the demo: the three steps on the bundled model and its data, few neurons and prompts."""

import json

import pytest

from conftest import ROOT
from delta_steering.artifacts import STEP2_NAME
from scripts import run_main

DEMO = ROOT / "models" / "mamba-tiny-demo"
DATA = DEMO / "demo_data"
pytestmark = [pytest.mark.usefixtures("punkt"),
              pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the demo model is not bundled")]


def test_demo_three_steps(tmp_path):
    common = ["--model", DEMO, "--device", "cpu", "--pile_path", DATA / "text.txt", "--pile_samples", "5", "--no_plots"]
    assert run_main("step1_neuron_discovery", [*common, "--tasks", DATA / "copying.jsonl", "--validation_size", "20",
                                               "--neurons", "0-3", "--save_path", tmp_path / "d.json",
                                               "--output_dir", tmp_path]) == 0
    step1 = json.loads((tmp_path / "d.json").read_text())
    assert step1["baseline_accuracy"] > 50 and len(step1["all_neuron_impacts"]) == 4 and len(step1["delta_variance"]) == 128
    assert run_main("step2_steering_factor_determination", [*common, "--neurons_file", tmp_path / "d.json",
                                                            "--num_examples", "20", "--factors", "2",
                                                            "--max_neurons", "2", "--output_dir", tmp_path]) == 0
    step2 = json.loads((tmp_path / STEP2_NAME).read_text())
    table = step2["groups"]["high_impact"]["results"] if step2["groups"]["high_impact"]["neurons"] else []
    assert [r["factor"] for r in table] in ([], [1.0, 2.0])  # the baseline is always a candidate
    assert step2["inputs"]["step1_file"]["path"] == str(tmp_path / "d.json")
    assert len(step2["importance_ranking"]["neurons"]) == 2
    assert run_main("step3_steer_performance_verification", [*common, "--neurons_file", tmp_path / "d.json",
                                                             "--factor", "2", "--ifeval_path", DATA / "ifeval_demo.jsonl",
                                                             "--num_samples", "2", "--max_new_tokens", "8",
                                                             "--output_dir", tmp_path]) == 0
    result = json.loads((tmp_path / "combined_steering_ifeval_results.json").read_text())
    assert [c["name"] for c in result["configurations"]][0] == "baseline"
