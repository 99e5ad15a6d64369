"""Step 2 end to end on the bundled demo model (a random tiny model barely reacts to amplification):
group amplification against rows of dt_proj scaled directly, the selection / confirmation rule,
perplexity, the step-1 file lookup and bad inputs."""

import json
import math

import pytest
import torch

import numpy as np

from delta_steering.artifacts import seal
from delta_steering.analysis.factors import group_result, mark, print_group_table, selection_best, selection_split
from delta_steering.analysis.stats import minimum_detectable_effect
from delta_steering.engine.scoring import score_examples
from delta_steering.analysis.metrics import summarize
from delta_steering.data.tasks import Example, load_examples
from mamba_model_loader import load_mamba_model
from scripts import interrupting, run_main, step1_file
from conftest import ROOT
from tiny import scaled_rows

DEMO = ROOT / "models" / "mamba-tiny-demo"
HIGH, NEUTRAL = [20, 63, 73, 110, 120], [4, 5, 6, 7, 8, 9]
LAYER, NUM_EXAMPLES = 20, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("step2")
    model, tokenizer = load_mamba_model(str(DEMO), "cpu")
    task = DEMO / "demo_data" / "ifeval_format.jsonl"
    impacts = {**{n: 3.0 + n for n in HIGH}, **{n: 0.5 - n / 10 for n in NEUTRAL}, 10: -5.0}
    step1_file(root / "step1.json", impacts, LAYER, DEMO, 128, tasks=[task])
    pile = root / "pile.txt"
    pile.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France, they say.\n\n"
                    "A man is sitting on a roof.\n\nWrite a poem about the sea.\n")
    return {"root": root, "task": task, "step1": root / "step1.json", "pile": pile, "model": model,
            "tokenizer": tokenizer, "dir": DEMO}


def step2(setup, out, *extra, neurons_file=None):
    argv = ["--model", setup["dir"], "--device", "cpu", "--output_dir", out, "--factors", "0.5,3",
            "--max_neurons", "3", "--num_examples", NUM_EXAMPLES, "--no_plots", *extra]
    if neurons_file is not False:
        argv += ["--neurons_file", neurons_file or setup["step1"]]
    return run_main("step2_steering_factor_determination", argv)


@pytest.fixture(scope="module")
def result(setup):
    out = setup["root"] / "out"
    assert step2(setup, out, "--perplexity_ablation", "--perplexity_layers", "19,20", "--pile_path", setup["pile"],
                 "--engine", "naive") == 0
    return json.loads((out / "cluster9_ablation_results_all_neurons.json").read_text())


def direct_accuracy(setup, layer, neurons, factor, part=None):
    """Independent recomputation: a copy of the model with the dt_proj rows scaled directly, on the
    held-out examples (or the listed {"task", "index"} examples of one half)."""
    model = scaled_rows(setup["model"], layer, neurons, factor)
    examples = load_examples([str(setup["task"])], None, "heldout", NUM_EXAMPLES)
    if part is not None:
        wanted = {e["index"] for e in part}
        examples = [e for e in examples if e.doc_id in wanted]
    return summarize(examples, score_examples(model, setup["tokenizer"], examples))["accuracy"]


def test_groups_and_amplification_on_the_selection_half_equal_direct_row_scaling(setup, result):
    assert result["groups"]["high_impact"]["neurons"] == HIGH
    assert result["groups"]["neutral"]["neurons"] == NEUTRAL
    selection = result["selection_examples"]
    for name, neurons in (("high_impact", HIGH), ("neutral", NEUTRAL)):
        table = result["groups"][name]["results"]
        assert table[0]["factor"] == 1.0 and table[0]["accuracy"] == result["selection_baseline_accuracy"]
        for entry in table[1:]:
            assert entry["accuracy"] == direct_accuracy(setup, LAYER, neurons, entry["factor"], selection)
            assert entry["delta"] == pytest.approx(entry["accuracy"] - result["selection_baseline_accuracy"], abs=1e-3)
            assert set(entry) >= {"factor", "accuracy", "delta", "per_task", "ci95", "p_value", "q_value", "label"}
            significant = entry["q_value"] < 0.05
            assert entry["label"] == ("✓ significant gain" if significant and entry["delta"] > 0 else
                                      "✗ significant loss" if significant and entry["delta"] < 0 else
                                      "~ no significant change")
    assert any(e["delta"] != 0 for g in result["groups"].values() for e in g["results"])


def test_selection_and_confirmation_halves_are_disjoint_held_out_examples(setup, result):
    selection = {e["index"] for e in result["selection_examples"]}
    confirmation = {e["index"] for e in result["confirmation_examples"]}
    heldout = {e.doc_id for e in load_examples([str(setup["task"])], None, "heldout", NUM_EXAMPLES)}
    discovery = {e.doc_id for e in load_examples([str(setup["task"])], None, "discovery", 200)}
    assert not selection & confirmation and selection | confirmation == heldout and not heldout & discovery
    assert abs(len(selection) - len(confirmation)) <= 1


def test_optimal_factor_is_confirmed_on_the_other_half(setup, result):
    for name, neurons in (("high_impact", HIGH), ("neutral", NEUTRAL)):
        optimal, table = result["optimal_factors"][name], result["groups"][name]["results"]
        best = selection_best(table)
        assert optimal["selection_best_factor"] == best["factor"]
        assert optimal["beats_baseline"] == (best["accuracy"] > result["selection_baseline_accuracy"])
        if not optimal["beats_baseline"]:
            assert optimal["factor"] == 1.0 and optimal["confirmation"] is None and not optimal["confirmed"]
            continue
        confirmation = optimal["confirmation"]
        assert optimal["factor"] == best["factor"]
        assert confirmation["baseline_accuracy"] == result["confirmation_baseline_accuracy"]
        assert confirmation["accuracy"] == direct_accuracy(setup, LAYER, neurons, best["factor"],
                                                           result["confirmation_examples"])
        assert optimal["confirmed"] == confirmation["significant"]


def synthetic_examples(n: int) -> list:
    return [Example("t", i, (("c", " a"), ("c", " b")), (" a", " b"), 0, "acc") for i in range(n)]


def test_when_every_factor_loses_the_baseline_is_kept():
    examples = synthetic_examples(40)
    baseline = np.ones(40)
    rows = {f: baseline.copy() for f in (0.5, 2.0, 5.0)}
    rows[0.5][:6], rows[2.0][:2], rows[5.0][:10] = 0, 0, 0  # every factor loses examples everywhere
    for f in rows:
        rows[f][20:] = rows[f][:20]
    group = group_result([1, 2], list(rows), rows, examples, baseline, seed=0)
    optimal = group["optimal"]
    assert optimal["factor"] == 1.0 and not optimal["beats_baseline"] and optimal["confirmation"] is None
    assert optimal["selection_best_factor"] == 2.0 and optimal["selection"]["delta"] < 0
    from delta_steering.artifacts import factor_to_steer
    from delta_steering.analysis.factors import verdict

    assert factor_to_steer(optimal) == (2.0, "step2-unconfirmed")
    assert verdict("High Impact", optimal, 20).startswith("no factor beats the baseline for the High Impact group")


def test_a_factor_that_wins_on_selection_and_loses_on_confirmation_is_not_confirmed():
    examples = synthetic_examples(60)
    baseline = np.zeros(60)
    selection, confirmation = selection_split(examples)
    row = baseline.copy()
    row[selection[:8]] = 1  # +8 examples on selection
    row[confirmation] = 0
    rows = {3.0: row, 0.5: baseline.copy()}
    optimal = group_result([1], [3.0, 0.5], rows, examples, baseline, seed=0)["optimal"]
    assert optimal["factor"] == 3.0 and optimal["beats_baseline"] and optimal["selection"]["delta"] > 0
    assert optimal["confirmation"]["delta"] == 0.0 and not optimal["confirmation"]["significant"]
    assert not optimal["confirmed"]
    row[confirmation[:12]] = 1  # now the gain holds on confirmation too
    optimal = group_result([1], [3.0, 0.5], rows, examples, baseline, seed=0)["optimal"]
    assert optimal["confirmation"]["significant"] and optimal["confirmed"]
    assert optimal["confirmation"]["p_value"] < 0.05 and optimal["confirmation"]["ci95"][0] > 0


def test_selection_best_tie_break_and_labels():
    rows = [{"factor": 1.0, "accuracy": 52.0}] + [{"factor": f, "accuracy": a} for f, a in
                                                   ((0.25, 50.0), (0.5, 52.0), (2.0, 52.0), (3.0, 52.0), (10.0, 40.0))]
    assert selection_best(rows)["factor"] == 0.5  # 0.5 and 2 are equally close to 1 in log scale
    rows[2]["accuracy"] = 51.0
    assert selection_best(rows)["factor"] == 2.0
    assert selection_best([{"factor": 2.0, "accuracy": None}]) is None
    assert (mark(2.0, 0.01), mark(-1.0, 0.001), mark(3.0, 0.2), mark(3.0, 0.0)) == ("✓", "✗", "~", "✓")


def test_importance_ranking_and_perplexity(setup, result):
    ranking = result["importance_ranking"]
    assert [r["neuron"] for r in ranking["neurons"]] != [] and len(ranking["neurons"]) == 3
    assert {r["neuron"] for r in ranking["neurons"]} == {120, 110, 73}  # the largest |step-1 impact|
    for r in ranking["neurons"]:
        assert r["impact"] == pytest.approx(result["baseline_accuracy"] - direct_accuracy(setup, LAYER, [r["neuron"]], 0.0),
                                            abs=1e-3)
    ppl = result["perplexity"]
    from pile_dataset_loader import load_pile_texts

    texts = load_pile_texts(100, 0, setup["pile"], role="evaluation")
    assert len(texts) == 2
    model, tokenizer = setup["model"], setup["tokenizer"]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text.strip("\n"))])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert ppl["baseline"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert [e["layer"] for e in ppl["layers"]] == [19, 20]
    assert ppl["factor"] == result["optimal_factors"]["high_impact"]["selection_best_factor"]
    assert ppl["factor_source"] == ("step2-confirmed" if result["optimal_factors"]["high_impact"]["confirmed"]
                                    else "step2-unconfirmed")
    assert ppl["documents"]["role"] == "evaluation"
    for entry in ppl["layers"]:
        for kind in ("ablated", "amplified"):
            change = entry[f"{kind}_change"]
            assert change["delta"] == pytest.approx(entry[kind] - ppl["baseline"], abs=1e-5)
            assert change["relative"] == pytest.approx(100 * (entry[kind] / ppl["baseline"] - 1), abs=1e-4)
            assert change["ci95"][0] <= change["ci95"][1] and change["relative_ci95"][0] <= change["relative_ci95"][1]


def test_minimum_detectable_effect_is_the_confirmation_halfs(result):
    limit = result["minimum_detectable_effect"]
    assert limit["examples"] == len(result["confirmation_examples"]) and (limit["alpha"], limit["power"]) == (0.05, 0.8)
    n = limit["examples"]  # one task: every example weighs the same
    assert limit["points"] == pytest.approx(minimum_detectable_effect(limit["discordance"], np.full(n, 100 / n)),
                                            abs=1e-3)
    assert "confirmation half" in limit["comparisons"]


def test_the_console_table_says_what_was_measured_never_nan(capsys):
    group = {"neurons": [1, 2], "selection_size": 40, "confirmation_size": 40, "results": [
        {"factor": 1.0, "accuracy": 50.0, "delta": 0.0, "ci95": None, "q_value": None, "label": "baseline"},
        {"factor": 3.0, "accuracy": 55.0, "delta": 5.0, "ci95": [1.0, 9.0], "q_value": 0.01,
         "label": "✓ significant gain"},
        {"factor": 100.0, "accuracy": None, "delta": None, "ci95": None, "q_value": None,
         "label": "? not scored (non-finite logits)"}],
        "optimal": {"factor": 3.0, "beats_baseline": True, "selection_best_factor": 3.0, "confirmed": False,
                    "selection": {"accuracy": 55.0, "delta": 5.0, "q_value": 0.01},
                    "confirmation": {"accuracy": 51.5, "baseline_accuracy": 50.0, "delta": 1.5, "ci95": [0.0, 3.0],
                                     "p_value": 0.09, "significant": False}}}
    limit = {"points": 4.2, "comparisons": "a group's factor vs the baseline on the confirmation half",
             "examples": 40, "discordance": 0.1, "alpha": 0.05, "power": 0.8}
    print_group_table("high_impact", group, 20, limit)
    out = capsys.readouterr().out
    assert "nan" not in out and "Strong" not in out and "Measured" in out
    assert "non-finite" in out and "significant gain" in out
    assert "Δ +1.50 is below the minimum detectable effect of the confirmation half (4.20 points)" in out


def test_a_model_split_between_cpu_and_disk_gives_the_tables_of_the_model_in_memory(setup, result, tmp_path, capsys):
    """2.7 MB of CPU memory holds all but blocks 19-23 (the steered layer among them), which are read
    from disk at each forward. Perplexity on offloaded layers is compared in test_placement and step 3."""
    assert step2(setup, tmp_path, "--engine", "naive", "--device", "auto", "--max_memory", "cpu=2.7MB",
                 "--offload_folder", tmp_path / "offload") == 0
    assert "disk: backbone.norm_f, backbone.layers.19-23" in capsys.readouterr().out
    offloaded = json.loads((tmp_path / "cluster9_ablation_results_all_neurons.json").read_text())
    unrecorded = {"run": None, "content_sha256": None, "perplexity": None}
    assert {**offloaded, **unrecorded} == {**result, **unrecorded}


def test_interrupted_run_resumes_to_the_same_result(setup, result, tmp_path, monkeypatch, capsys):
    from delta_steering.steps import determine_factors

    real = determine_factors.score_examples
    monkeypatch.setattr(determine_factors, "score_examples", interrupting(real, on_call=3))  # baseline, a factor, stop
    run = ("--perplexity_ablation", "--perplexity_layers", "19,20", "--pile_path", setup["pile"], "--engine", "naive")
    step1_file = tmp_path / "step1.json"
    step1_file.write_text(setup["step1"].read_text())
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 130
    saved = json.loads((tmp_path / "step2_checkpoint.json").read_text())
    assert list(saved["done"]) == ["factor/high_impact/0.5"]
    monkeypatch.setattr(determine_factors, "score_examples", real)
    assert step2(setup, tmp_path, *run, "--factors", "0.5,2", neurons_file=step1_file) == 2  # other arguments
    step1_file.write_text(setup["step1"].read_text() + "\n")
    capsys.readouterr()
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 2  # another version of the step-1 file
    assert f"another version of step-1 file {step1_file}" in capsys.readouterr().err
    step1_file.write_text(setup["step1"].read_text())
    assert step2(setup, tmp_path, *run, neurons_file=step1_file) == 0
    resumed = json.loads((tmp_path / "cluster9_ablation_results_all_neurons.json").read_text())
    unrecorded = {"run": None, "inputs": None, "content_sha256": None}
    assert {**resumed, **unrecorded} == {**result, **unrecorded}
    assert resumed["inputs"]["step1_file"]["sha256"] == result["inputs"]["step1_file"]["sha256"]
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
    assert saved["inputs"]["step1_file"]["path"] == "ablation_3_results/discovered_neurons.json"


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("all_neuron_impacts"), "malformed"),
    (lambda d: d["all_neuron_impacts"].append({"neuron": 128, "impact": 1.0}), "neuron 128 does not fit this model"),
    (lambda d: d.update(model="state-spaces/mamba-130m-hf", model_digest="0" * 64), "--allow_model_mismatch"),
    (lambda d: d.update(layer=30), "layer 30 out of range"),
])
def test_bad_step1_files_exit_2(setup, tmp_path, capsys, change, message):
    data = json.loads(setup["step1"].read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(seal(data)))  # consistent, as a step would write it: only the field is wrong
    assert step2(setup, tmp_path, neurons_file=path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_other_bad_inputs_exit_2(setup, tmp_path, capsys):
    assert step2(setup, tmp_path, neurons_file=tmp_path / "missing.json") == 2
    assert step2(setup, tmp_path, "--factors", "2,x") == 2
    assert step2(setup, tmp_path, "--num_examples", "1") == 2
    assert step2(setup, tmp_path, "--perplexity_ablation", "--perplexity_layers", "40", "--num_examples", "2") == 2
    assert step2(setup, tmp_path, "--factors", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and "missing.json" in err[0] and "--factors" in err[1] and "layer" in err[3].lower()
    assert "selection and a confirmation half" in err[2] and "other than 1 (the baseline)" in err[4]
