"""Step 2 end to end on a tiny model: group amplification against rows of dt_proj scaled directly,
the optimal factor, perplexity, the step-1 file lookup and bad inputs."""

import copy
import json
import math

import pytest
import torch

from delta_steering.factors import mark, optimal_factor, strength
from delta_steering.scoring import evaluate, summarize
from delta_steering.tasks import load_examples
from mamba_model_loader import load_mamba_model
from scripts import interrupting, run_main
from tiny import near_tie_task

HIGH, NEUTRAL = [0, 1, 2, 3], [4, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("step2")
    model, tokenizer = load_mamba_model(str(tiny_model_dir), "cpu")
    task = near_tie_task(model, tokenizer, root / "near_ties.jsonl", n=18)
    impacts = [{"neuron": n, "impact": 3.0 + n} for n in HIGH] + [{"neuron": n, "impact": 0.5 - n / 10} for n in NEUTRAL]
    impacts.append({"neuron": 10, "impact": -5.0})
    step1 = {"beneficial_neurons": HIGH + NEUTRAL, "baseline_accuracy": 50.0, "criterion": "impact >= -2.0%",
             "all_neuron_impacts": impacts, "layer": 23, "model": str(tiny_model_dir), "tasks": [str(task)]}
    (root / "step1.json").write_text(json.dumps(step1))
    pile = root / "pile.txt"
    pile.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France, they say.\n")
    return {"root": root, "task": task, "step1": root / "step1.json", "pile": pile, "model": model,
            "tokenizer": tokenizer, "dir": tiny_model_dir}


def step2(setup, out, *extra, neurons_file=None):
    argv = ["--model", setup["dir"], "--device", "cpu", "--output_dir", out, "--factors", "0.5,3",
            "--max_neurons", "3", "--no_plots", *extra]
    if neurons_file is not False:
        argv += ["--neurons_file", neurons_file or setup["step1"]]
    return run_main("step2_steering_factor_determination", argv)


@pytest.fixture(scope="module")
def result(setup):
    out = setup["root"] / "out"
    assert step2(setup, out, "--perplexity_ablation", "--perplexity_layers", "22,23", "--pile_path", setup["pile"],
                 "--engine", "naive") == 0
    return json.loads((out / "cluster9_ablation_results_all_neurons.json").read_text())


def direct_accuracy(setup, layer, neurons, factor):
    """Independent recomputation: a copy of the model with the dt_proj rows scaled directly."""
    model = copy.deepcopy(setup["model"])
    with torch.no_grad():
        model.backbone.layers[layer].mixer.dt_proj.weight[neurons] *= factor
        model.backbone.layers[layer].mixer.dt_proj.bias[neurons] *= factor
    examples = load_examples([str(setup["task"])], None, "heldout", 100)
    return summarize(examples, evaluate(model, setup["tokenizer"], examples))["accuracy"]


def test_groups_and_amplification_equal_direct_row_scaling(setup, result):
    assert result["groups"]["high_impact"]["neurons"] == HIGH
    assert result["groups"]["neutral"]["neurons"] == NEUTRAL
    for name, neurons in (("high_impact", HIGH), ("neutral", NEUTRAL)):
        for entry in result["groups"][name]["results"]:
            assert entry["accuracy"] == direct_accuracy(setup, 23, neurons, entry["factor"])
            assert entry["delta"] == pytest.approx(entry["accuracy"] - result["baseline_accuracy"], abs=1e-3)
            assert set(entry) >= {"factor", "accuracy", "delta", "per_task", "ci95", "label"}
            assert entry["label"] == f"{mark(entry['ci95'])} {strength(entry['factor'])}"
    assert any(e["delta"] != 0 for g in result["groups"].values() for e in g["results"])


def test_optimal_factor_agrees_with_the_table(result):
    for group in result["groups"].values():
        best = max(e["accuracy"] for e in group["results"])
        assert group["optimal"]["accuracy"] == best
        assert group["optimal"]["factor"] in [e["factor"] for e in group["results"] if e["accuracy"] == best]
    assert result["optimal_factors"]["high_impact"] == result["groups"]["high_impact"]["optimal"]["factor"]


def test_optimal_factor_tie_break_and_labels():
    rows = [{"factor": f, "accuracy": a, "delta": 0.0, "ci95": [-1.0, 1.0]} for f, a in
            ((0.25, 50.0), (0.5, 52.0), (2.0, 52.0), (3.0, 52.0), (10.0, 40.0))]
    assert optimal_factor(rows)["factor"] == 0.5  # 0.5 and 2 are equally close to 1 in log scale
    rows[1]["accuracy"] = 51.0
    assert optimal_factor(rows)["factor"] == 2.0
    assert optimal_factor([{"factor": 2.0, "accuracy": None}]) is None
    assert [strength(f) for f in (0.5, 1.5, 3, 5, 8, 9, 100)] == ["Suppress", "Moderate", "Moderate", "Strong",
                                                                   "Strong", "Very strong", "Very strong"]
    assert (mark([0.5, 2.0]), mark([-3.0, -0.1]), mark([-1.0, 1.0])) == ("✓", "✗", "~")


def test_importance_ranking_and_perplexity(setup, result):
    ranking = result["importance_ranking"]
    assert [r["neuron"] for r in ranking["neurons"]] != [] and len(ranking["neurons"]) == 3
    assert {r["neuron"] for r in ranking["neurons"]} == {10, 3, 2}  # the largest |step-1 impact|
    for r in ranking["neurons"]:
        assert r["impact"] == pytest.approx(result["baseline_accuracy"] - direct_accuracy(setup, 23, [r["neuron"]], 0.0),
                                            abs=1e-3)
    ppl = result["perplexity"]
    texts = setup["pile"].read_text().split("\n\n")
    model, tokenizer = setup["model"], setup["tokenizer"]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text.strip("\n"))])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert ppl["baseline"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert [e["layer"] for e in ppl["layers"]] == [22, 23] and ppl["factor"] == result["optimal_factors"]["high_impact"]


def test_interrupted_run_resumes_to_the_same_result(setup, result, tmp_path, monkeypatch, capsys):
    import step2_steering_factor_determination as step2_script

    real = step2_script.evaluate
    monkeypatch.setattr(step2_script, "evaluate", interrupting(real, on_call=3))  # baseline, a factor, stop
    run = ("--perplexity_ablation", "--perplexity_layers", "22,23", "--pile_path", setup["pile"], "--engine", "naive")
    step1_file = tmp_path / "step1.json"
    step1_file.write_text(setup["step1"].read_text())
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 130
    saved = json.loads((tmp_path / "step2_checkpoint.json").read_text())
    assert list(saved["done"]) == [repr(("factor", "high_impact", 0.5))]
    monkeypatch.setattr(step2_script, "evaluate", real)
    assert step2(setup, tmp_path, *run, "--factors", "0.5,2", neurons_file=step1_file) == 2  # other arguments
    step1_file.write_text(setup["step1"].read_text() + "\n")
    capsys.readouterr()
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 2  # another version of the step-1 file
    assert "different arguments (step1_sha256)" in capsys.readouterr().err
    step1_file.write_text(setup["step1"].read_text())
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 0
    resumed = json.loads((tmp_path / "cluster9_ablation_results_all_neurons.json").read_text())
    assert {**resumed, "run": None, "step1_file": None} == {**result, "run": None, "step1_file": None}
    assert not (tmp_path / "step2_checkpoint.json").exists()


def test_step1_file_lookup_order(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert step2(setup, tmp_path / "o", neurons_file=False) == 2
    assert "tried discovered_neurons.json, ablation_3_results/discovered_neurons.json" in capsys.readouterr().err
    (tmp_path / "ablation_3_results").mkdir()
    data = json.loads(setup["step1"].read_text())
    (tmp_path / "ablation_3_results" / "discovered_neurons.json").write_text(json.dumps(data))
    (tmp_path / "discovered_neurons.json").write_text("{broken")
    assert step2(setup, tmp_path / "o", "--num_examples", "2", "--factors", "2", neurons_file=False) == 2
    assert "discovered_neurons.json is not valid JSON" in capsys.readouterr().err  # the first path wins
    (tmp_path / "discovered_neurons.json").unlink()
    assert step2(setup, tmp_path / "o", "--num_examples", "2", "--factors", "2", "--max_neurons", "1",
                 neurons_file=False) == 0
    saved = json.loads((tmp_path / "o" / "cluster9_ablation_results_all_neurons.json").read_text())
    assert saved["step1_file"] == "ablation_3_results/discovered_neurons.json"


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("all_neuron_impacts"), "malformed"),
    (lambda d: d["all_neuron_impacts"].append({"neuron": 32, "impact": 1.0}), "neuron 32 out of range"),
    (lambda d: d.update(model="state-spaces/mamba-130m-hf"), "--allow_model_mismatch"),
    (lambda d: d.update(layer=30), "layer 30 out of range"),
])
def test_bad_step1_files_exit_2(setup, tmp_path, capsys, change, message):
    data = json.loads(setup["step1"].read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert step2(setup, tmp_path, neurons_file=path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_other_bad_inputs_exit_2(setup, tmp_path, capsys):
    assert step2(setup, tmp_path, neurons_file=tmp_path / "missing.json") == 2
    assert step2(setup, tmp_path, "--factors", "2,x") == 2
    assert step2(setup, tmp_path, "--num_examples", "0") == 2
    assert step2(setup, tmp_path, "--perplexity_ablation", "--perplexity_layers", "40", "--num_examples", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "missing.json" in err[0] and "--factors" in err[1] and "layer" in err[3].lower()
