"""Step 1 end to end on a tiny model: per-neuron accuracies against an independent recomputation,
resume after interruption, and every bad input exiting 2 with one line."""

import copy
import json

import numpy as np
import pytest
import torch

from delta_steering.engine.scoring import score_examples
from delta_steering.analysis.metrics import summarize
from delta_steering.data.tasks import load_examples
from mamba_model_loader import load_mamba_model
from scripts import interrupting, one_line, run_main
from tiny import near_tie_task

@pytest.fixture(scope="module")
def task_file(tiny_model_dir, tmp_path_factory):
    model, tokenizer = load_mamba_model(str(tiny_model_dir), "cpu")
    return near_tie_task(model, tokenizer, tmp_path_factory.mktemp("tasks") / "near_ties.jsonl")


@pytest.fixture(scope="module")
def pile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pile") / "pile.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n\n"
                    "Write a poem about the sea, with commas.\n")
    return path


def step1(tiny_model_dir, task_file, pile_file, out_dir, *extra):
    argv = ["--model", tiny_model_dir, "--tasks", task_file, "--save_path", out_dir / "out.json", "--device", "cpu",
            "--pile_path", pile_file, "--output_dir", out_dir, "--no_plots", *extra]
    return run_main("step1_neuron_discovery", argv)


@pytest.fixture(scope="module")
def naive_run(tiny_model_dir, task_file, pile_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("naive")
    assert step1(tiny_model_dir, task_file, pile_file, out, "--neurons", "0-19", "--layer", "23",
                 "--engine", "naive") == 0
    return json.loads((out / "out.json").read_text())


def test_groups_follow_the_recorded_cut_and_the_minimum_detectable_effect_is_written(naive_run):
    from delta_steering.analysis.stats import minimum_detectable_effect

    assert naive_run["high_impact_cut"] == 2.0 and "high_impact_cut" in naive_run["description"]
    measured = [r for r in naive_run["all_neuron_impacts"] if r["impact"] is not None]
    assert naive_run["groups"]["high_impact"] == sorted(r["neuron"] for r in measured if r["impact"] > 2.0)
    limit = naive_run["minimum_detectable_effect"]
    n = sum(naive_run["num_examples"].values())  # one task: every example weighs the same
    assert limit["examples"] == n and limit["comparisons"] == "a neuron ablated vs the baseline"
    lost_or_gained = np.mean([(r["examples_lost"] + r["examples_gained"]) / n for r in measured])
    assert limit["discordance"] == pytest.approx(lost_or_gained, abs=1e-4)  # 0/1 scores: changed = lost + gained
    expected = minimum_detectable_effect(lost_or_gained, np.full(n, 100 / n))
    assert limit["points"] == (None if expected is None else pytest.approx(expected, abs=1e-3))


def test_a_larger_cut_makes_fewer_high_impact_neurons(tiny_model_dir, task_file, pile_file, tmp_path, capsys):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-19", "--layer", "23",
                 "--engine", "naive", "--high_impact_cut", "0.5") == 0
    result = json.loads((tmp_path / "out.json").read_text())
    measured = [r for r in result["all_neuron_impacts"] if r["impact"] is not None]
    assert result["high_impact_cut"] == 0.5
    assert result["groups"]["high_impact"] == sorted(r["neuron"] for r in measured if r["impact"] > 0.5)
    assert result["groups"]["neutral"] == sorted(r["neuron"] for r in measured if abs(r["impact"]) <= 0.5)
    out = capsys.readouterr().out
    assert "High Impact (impact > 0.5)" in out and "inimum detectable effect" in out
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--high_impact_cut", "-1") == 2
    assert "--high_impact_cut must be 0 or more points" in capsys.readouterr().err


def test_json_has_the_seed_fields_and_the_trust_fields(naive_run):
    assert set(naive_run) >= {"beneficial_neurons", "baseline_accuracy", "criterion", "all_neuron_impacts", "layer",
                             "model", "tasks", "validation_size", "per_task_baseline", "delta_variance",
                             "high_variance_neurons", "run"}
    assert naive_run["criterion"] == "impact >= -2.0 points"
    impacts = [r["impact"] for r in naive_run["all_neuron_impacts"]]
    assert impacts == sorted(impacts, reverse=True) and len(impacts) == 20
    assert naive_run["beneficial_neurons"] == sorted(r["neuron"] for r in naive_run["all_neuron_impacts"]
                                                    if r["impact"] >= -2.0)
    assert len(naive_run["delta_variance"]) == 32
    assert naive_run["high_variance_neurons"][0] == int(np.argmax(naive_run["delta_variance"]))
    record = naive_run["all_neuron_impacts"][0]
    assert set(record) >= {"neuron", "impact", "accuracy", "per_task", "ci95", "p_value", "q_value"}
    assert record["ci95"][0] <= record["impact"] <= record["ci95"][1]
    assert naive_run["run"]["versions"]["torch"] and naive_run["run"]["args"]["layer"] == 23
    assert any(r["impact"] != 0 for r in naive_run["all_neuron_impacts"])  # the tiny model has neurons that matter


def test_per_neuron_accuracy_equals_direct_weight_zeroing(naive_run, tiny_model_dir, task_file):
    model, tokenizer = load_mamba_model(str(tiny_model_dir), "cpu")
    examples = load_examples([str(task_file)], None, "discovery", 200)
    by_neuron = {r["neuron"]: r for r in naive_run["all_neuron_impacts"]}
    assert naive_run["baseline_accuracy"] == summarize(examples, score_examples(model, tokenizer, examples))["accuracy"]
    for neuron in (0, 7, 13, 19):
        edited = copy.deepcopy(model)
        with torch.no_grad():
            edited.backbone.layers[23].mixer.dt_proj.weight[neuron] = 0
            edited.backbone.layers[23].mixer.dt_proj.bias[neuron] = 0
        accuracy = summarize(examples, score_examples(edited, tokenizer, examples))["accuracy"]
        assert by_neuron[neuron]["accuracy"] == accuracy
        assert by_neuron[neuron]["impact"] == pytest.approx(naive_run["baseline_accuracy"] - accuracy, abs=1e-3)


def strip_run(result):
    return {k: v for k, v in result.items() if k not in ("run", "content_sha256")}


def test_fast_engine_gives_the_same_json(naive_run, tiny_model_dir, task_file, pile_file, tmp_path):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-19", "--layer", "23",
                 "--engine", "fast", "--batch_size", "3") == 0
    fast = json.loads((tmp_path / "out.json").read_text())
    assert {**strip_run(fast), "engine": "naive"} == strip_run(naive_run)


def test_a_model_offloaded_to_disk_gives_the_impacts_of_the_model_in_memory(naive_run, tiny_model_dir, task_file,
                                                                            pile_file, tmp_path, capsys):
    """40 KB of CPU memory holds the embeddings and the head; every block is read from disk at each forward."""
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-19", "--layer", "23",
                 "--device", "auto", "--max_memory", "cpu=40KB", "--offload_folder", tmp_path / "offload") == 0
    assert "device map: cpu: backbone.embeddings, lm_head; disk: " in capsys.readouterr().out
    offloaded = json.loads((tmp_path / "out.json").read_text())
    assert offloaded["run"]["model"]["device"].startswith("auto (cpu: ")
    assert {**strip_run(offloaded), "engine": "naive"} == strip_run(naive_run)


def test_a_model_too_large_for_its_memory_is_refused_before_any_weight_is_read(tiny_model_dir, task_file, pile_file,
                                                                              tmp_path, capsys, monkeypatch):
    from delta_steering.model import loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", refuse)
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--device", "auto", "--max_memory", "cpu=40KB") == 2
    line = one_line(capsys)
    assert "(251.6 KiB in float32) does not fit the memory it may use (cpu 39.1 KiB allowed of " in line
    assert "add --offload_folder DIR" in line and "raise --max_memory" in line
    monkeypatch.setattr(loading, "free_bytes", lambda device: 100_000)  # a machine with 100 KB free
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path) == 2
    line = one_line(capsys)
    assert "needs 251.6 KiB in float32 but cpu has 97.7 KiB free: use --device auto --offload_folder DIR" in line


def test_interrupted_run_resumes_to_the_same_result(naive_run, tiny_model_dir, task_file, pile_file, tmp_path,
                                                    monkeypatch, capsys):
    from delta_steering.steps import discover

    real = discover.sweep_correctness
    monkeypatch.setattr(discover, "sweep_correctness", interrupting(real, on_call=2))
    run = ("--neurons", "0-19", "--engine", "naive", "--chunk_neurons", "16")
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, *run, "--layer", "23") == 130
    saved = json.loads((tmp_path / "step1_checkpoint.json").read_text())
    assert len([n for done in saved["done"].values() for n in done]) == 16 and not (tmp_path / "out.json").exists()
    monkeypatch.setattr(discover, "sweep_correctness", real)
    # a different layer must not silently reuse the checkpoint
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, *run, "--layer", "22") == 2
    capsys.readouterr()
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, *run, "--layer", "23") == 0
    assert "resuming: 1 of 2 chunks done" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "out.json").read_text())
    assert strip_run(resumed) == strip_run(naive_run)
    assert not (tmp_path / "step1_checkpoint.json").exists()


def test_a_resume_with_a_changed_input_is_refused_naming_it(tiny_model_dir, task_file, pile_file, tmp_path,
                                                             monkeypatch, capsys):
    """Half the chunks done, then a line of the task file changes (or the Pile file, or the weights): the
    rerun must not mix the two."""
    import shutil

    from delta_steering.steps import discover

    task, pile = shutil.copy(task_file, tmp_path / "task.jsonl"), shutil.copy(pile_file, tmp_path / "pile.txt")
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    real = discover.sweep_correctness
    monkeypatch.setattr(discover, "sweep_correctness", interrupting(real, on_call=2))
    run = ("--neurons", "0-7", "--engine", "naive", "--chunk_neurons", "4")
    assert step1(model, task, pile, tmp_path, *run) == 130
    monkeypatch.setattr(discover, "sweep_correctness", real)
    original = task.read_text()
    rows = original.splitlines()
    row = json.loads(rows[1])
    row["label"] = 1 - row["label"]
    task.write_text("\n".join([rows[0], json.dumps(row), *rows[2:]]) + "\n")
    capsys.readouterr()
    assert step1(model, task, pile, tmp_path, *run) == 2
    assert f"another version of task file {task} (SHA-256" in one_line(capsys)
    task.write_text(original)
    pile.write_text(pile.read_text() + "\nOne more document.\n")
    assert step1(model, task, pile, tmp_path, *run) == 2
    assert f"another version of Pile file {pile} (SHA-256" in one_line(capsys)
    pile.write_text(pile_file.read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["backbone.layers.0.mixer.D"][0] += 1.0  # other weights, the same config and path
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert step1(model, task, pile, tmp_path, *run) == 2
    assert "another version of the model's weights" in one_line(capsys)
    assert step1(model, task, pile, tmp_path, *run, "--overwrite") == 0
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--layer", "24"], "--layer 24 out of range: the model has layers 0-23"),
    (["--neurons", "0-40"], "neuron 32 out of range"),
    (["--neurons", "3-x"], "malformed --neurons"),
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "gsm8k"], "gsm8k has output_type generate_until"),
    (["--tasks", "piqa", "--data_dir", "/nonexistent"], "piqa/validation.jsonl not found"),
    (["--validation_size", "0"], "--validation_size must be at least 1"),
    (["--model", "./no/such/dir"], "local model directory not found"),
    (["--max_memory", "cpu=1GB"], "--max_memory and --offload_folder spread the model over devices with --device auto"),
    (["--device", "auto", "--max_memory", "7=1GB"], "--max_memory names GPU 7, which this machine does not have"),
])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, task_file, pile_file, tmp_path, capsys, extra, message):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_empty_and_malformed_task_files_exit_2(tiny_model_dir, pile_file, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert step1(tiny_model_dir, empty, pile_file, tmp_path) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "a", "choices": "x", "label": 0}\n')
    assert step1(tiny_model_dir, bad, pile_file, tmp_path) == 2
    one_choice = tmp_path / "one_choice.jsonl"
    one_choice.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "b", "choices": ["x"], "label": 0}\n')
    assert step1(tiny_model_dir, one_choice, pile_file, tmp_path) == 2
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes('{"context": "caf\u00e9", "choices": ["x", "y"], "label": 0}\n'.encode("latin-1"))
    assert step1(tiny_model_dir, not_utf8, pile_file, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "Traceback" not in " ".join(err)
    assert "empty" in err[0] and "line 2" in err[1]
    assert "line 2: one choice only" in err[2] and "not UTF-8" in err[3]


def test_all_six_builtin_tasks_from_shared_data(shared_data, two_layer_model_dir, pile_file, tmp_path):
    argv = ["--model", two_layer_model_dir, "--layer", "1", "--data_dir", shared_data / "tasks_hf", "--validation_size", "20",
            "--save_path", tmp_path / "out.json", "--device", "cpu", "--pile_path", pile_file,
            "--output_dir", tmp_path, "--neurons", "0-1", "--batch_size", "64", "--engine", "naive"]
    assert run_main("step1_neuron_discovery", argv) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["per_task_baseline"]) == {"lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge",
                                                "winogrande"}
    assert all(n == 20 for n in result["num_examples"].values())
    assert (tmp_path / "impact_ranked_L1.png").is_file()


def test_attribution_screens_then_verifies_exactly(naive_run, tiny_model_dir, task_file, pile_file, tmp_path, capsys):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-19", "--layer", "23",
                 "--method", "attribution", "--verify_top", "5", "--recall_sample", "6") == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["attribution_estimates"]) == 20 and len(result["verified_neurons"]) == 5
    ranked = sorted(result["attribution_estimates"],
                    key=lambda e: (-e["estimated_impact"], -e["estimated_margin_loss"], e["neuron"]))
    assert result["verified_neurons"] == sorted(e["neuron"] for e in ranked[:5])  # the screen's top 5
    sample = result["recall_sample_neurons"]  # 6 of the 15 screened out, measured exactly too
    assert len(sample) == 6 and not set(sample) & set(result["verified_neurons"]) and sample == sorted(sample)
    estimates = {e["neuron"]: e for e in result["attribution_estimates"]}
    exact = {r["neuron"]: r for r in naive_run["all_neuron_impacts"]}
    records = result["all_neuron_impacts"]
    assert sorted(r["neuron"] for r in records) == list(range(20)) and result["measured_neurons"] == 11
    for record in records:
        assert record["measured"] == (record["neuron"] in result["verified_neurons"] + sample)
        if record["measured"]:
            assert record["impact"] == exact[record["neuron"]]["impact"]  # verified values are the exact ones
            assert record["estimated_impact"] == estimates[record["neuron"]]["estimated_impact"]
        else:
            assert record["impact"] is None and record["q_value"] == 1.0
    # BH over all 20 neurons, an unverified neuron counting as p = 1
    from delta_steering.analysis.stats import benjamini_hochberg

    p_values = [r["p_value"] if r["measured"] else 1.0 for r in records]
    assert [r["q_value"] for r in records] == benjamini_hochberg(p_values)
    unmeasured = {r["neuron"] for r in records if not r["measured"]}
    assert not unmeasured & set(result["beneficial_neurons"] + result["groups"]["neutral"] + result["groups"]["high_impact"])
    assert "spearman_margin_loss" in result
    # the recall: the sample's neurons that test significant (the same q-values) against the verified ones
    significant = set(result["significant_neurons"])
    recall = result["recall"]
    assert recall["sample_significant"] == sorted(significant & set(sample)) and recall["screened_out"] == 15
    assert recall["verified_significant"] == len(significant & set(result["verified_neurons"]))
    assert "recall of the screen: a random sample of 6 of the 15 neurons" in capsys.readouterr().out


def test_a_neuron_whose_p_value_underflows_to_zero_is_significant():
    from delta_steering.artifacts import Provenance
    from delta_steering.analysis.impacts import discovery_result, neuron_impacts
    from delta_steering.data.tasks import Example

    examples = [Example("t", i, (("c", " a"), ("c", " b")), (" a", " b"), 0, "acc") for i in range(1200)]
    baseline = np.ones(1200)
    ablated = np.stack([np.zeros(1200), baseline])  # neuron 0 loses every example, neuron 1 none
    records = neuron_impacts(examples, baseline, ablated, [0, 1], [1.0, 2.0], seed=0)
    assert records[0]["neuron"] == 0 and records[0]["p_value"] == 0.0 and records[0]["q_value"] == 0.0
    stats = {"delta_variance": [1.0, 2.0], "dt_pre_mean": [0.0, 0.0], "num_tokens": 5}
    provenance = Provenance("m", "0" * 64, "mamba", 0)
    result = discovery_result(examples, baseline, records, -2.0, provenance, ["t"], 1200, stats)
    assert result.report["significant_neurons"] == [0]


def test_discovery_examples_are_recorded(naive_run, task_file):
    examples = load_examples([str(task_file)], None, "discovery", 200)
    assert naive_run["discovery_examples"] == [{"task": "near_ties", "index": e.doc_id} for e in examples]
    heldout = {e.doc_id for e in load_examples([str(task_file)], None, "heldout", 200)}
    assert not heldout & {e["index"] for e in naive_run["discovery_examples"]}
    assert naive_run["delta_statistics_documents"]["role"] == "statistics"


def test_the_screens_recall_and_its_clopper_pearson_interval():
    from scipy import stats

    from delta_steering.analysis.impacts import recall_sample, screen_recall

    recall = screen_recall(3, [7], 10, 50)  # 3 significant picks; 1 of 10 sampled of 50 screened out
    low, high = stats.beta.ppf(0.025, 1, 10), stats.beta.ppf(0.975, 2, 9)  # Clopper-Pearson for 1 of 10
    assert recall["estimated_missed"] == 5.0 and recall["estimated_recall"] == 0.375  # 1 + 40 x 0.1 missed
    assert recall["recall_ci95"] == pytest.approx([3 / (3 + 1 + 40 * high), 3 / (3 + 1 + 40 * low)], abs=1e-4)
    assert screen_recall(4, [], 20, 20)["recall_ci95"] == [1.0, 1.0]  # every screened-out neuron measured
    assert screen_recall(0, [], 10, 50)["estimated_recall"] is None  # nothing significant: undefined
    sample = recall_sample(list(range(100)), 10, seed=3)
    assert sample == recall_sample(list(range(100)), 10, seed=3) != recall_sample(list(range(100)), 10, seed=4)
    assert len(set(sample)) == 10 and sample == sorted(sample) and recall_sample([5, 9], 10, 0) == [5, 9]


@pytest.mark.parametrize("budget, method", [("0", "attribution"), ("100000", "exact")])
def test_method_auto_measures_exactly_within_the_budget(tiny_model_dir, task_file, pile_file, tmp_path, capsys,
                                                        budget, method):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-9", "--layer", "23",
                 "--exact_budget", budget, "--verify_top", "3", "--recall_sample", "2") == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["method"] == method and result["measured_neurons"] == (5 if method == "attribution" else 10)
    assert f"--method auto: {method}: the exact sweep of 10 neurons is projected at" in capsys.readouterr().out


def test_method_auto_is_exact_in_a_split_run(tiny_model_dir, task_file, pile_file, tmp_path, capsys):
    assert step1(tiny_model_dir, task_file, pile_file, tmp_path, "--neurons", "0-9", "--shard", "0/2") == 0
    assert "--method auto: exact: a run split over processes" in capsys.readouterr().out
    shard = json.loads(next((tmp_path / "shards").glob("step1.shard0of2.json")).read_text())
    assert shard["context"]["method"] == "exact" and shard["context"]["verified"] is None


def test_a_refused_run_leaves_no_empty_folder_it_made(tiny_model_dir, task_file, pile_file, tmp_path, capsys):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b"  # refused before the model loads
    assert step1(tiny_model_dir, task_file, pile_file, out, "--layer", "99") == 2
    assert "--layer 99 out of range" in one_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_model_with_nan_weights_is_one_line_before_any_measurement(tiny_model_dir, task_file, pile_file, tmp_path,
                                                                     capsys, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from delta_steering.steps import discover

    broken = shutil.copytree(tiny_model_dir, tmp_path / "nan-model")
    weights = load_file(broken / "model.safetensors")
    weights["backbone.layers.5.mixer.D"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(discover, "delta_statistics", lambda *a, **k: pytest.fail("measured before the check"))
    assert step1(broken, task_file, pile_file, tmp_path / "o", "--neurons", "0-3") == 2
    line = one_line(capsys)
    assert "the baseline's outputs are not finite" in line and "backbone.layers.5.mixer.D" in line
