"""The delta atlas: its first-order estimates against per-layer attribution, its exact re-measurements
against whole-model ablation, a planted loud neuron found in its layer and ranked first, BH over every
neuron of every layer, the step-1 file it writes for step 2, the figure, and bad inputs."""

import json
import random

import numpy as np
import pytest
import torch

from delta_steering.artifacts import read_discovery
from delta_steering.engine.attribution import atlas_estimates
from delta_steering.engine.attribution import attribution, layer_attributions
from delta_steering.analysis.estimates import estimated_impacts
from delta_steering.model.delta_stats import delta_statistics, layer_delta_statistics
from delta_steering.intervention import Intervention
from delta_steering.engine.scoring import encode_examples, encode_pair, loglikelihoods, score_examples
from delta_steering.analysis.metrics import summarize
from delta_steering.analysis.atlas import layer_entry, print_atlas
from delta_steering.analysis.stats import benjamini_hochberg, is_significant
from delta_steering.model.steering import steer
from delta_steering.data.tasks import load_examples
from families import make_tiny
from scripts import run_main
from tiny import make_model, near_tie_task

ALL = range(32)
PLANTED_LAYER, PLANTED_NEURON, LAYERS = 9, 13, 12


@pytest.fixture(scope="module")
def near_ties(tiny_model, tokenizer, tmp_path_factory):
    path = near_tie_task(tiny_model, tokenizer, tmp_path_factory.mktemp("atlas") / "near_ties.jsonl")
    examples = load_examples([str(path)], None, "discovery", 24)
    return examples, encode_examples(tokenizer, examples)


def test_estimates_at_every_layer_equal_one_layer_attribution_runs(tiny_model, tokenizer, near_ties):
    examples, encoded = near_ties
    ablations = {0: Intervention.scale(ALL, 0.0), 11: Intervention.ablation("mean", ALL, [0.3] * 32),
                 20: Intervention.scale(ALL, 1.5), 23: Intervention.scale(ALL, 0.0)}
    together = layer_attributions(tiny_model, tokenizer, examples, encoded, ablations)
    estimates = atlas_estimates(tiny_model, tokenizer, examples, encoded, ablations)
    for layer, intervention in ablations.items():
        alone = attribution(tiny_model, tokenizer, examples, encoded, layer, intervention)
        np.testing.assert_allclose(together[layer].base, alone.base, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(together[layer].delta, alone.delta, rtol=1e-4, atol=1e-7)
        assert np.abs(alone.delta).max() > 1e-3  # the estimates are not trivially zero
        impact, margin_loss = estimated_impacts(examples, alone)
        assert [e["estimated_impact"] for e in estimates[layer]] == pytest.approx(impact, abs=1e-3)
        assert [e["estimated_margin_loss"] for e in estimates[layer]] == pytest.approx(margin_loss, rel=1e-3, abs=1e-6)


def test_layer_delta_statistics_equal_one_layer_runs(tiny_model, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    together = layer_delta_statistics(tiny_model, tokenizer, texts, [3, 20])
    for layer in (3, 20):
        alone = delta_statistics(tiny_model, tokenizer, texts, layer)
        for key in ("dt_pre_mean", "delta_variance"):
            torch.testing.assert_close(together[layer][key], alone[key], rtol=0, atol=0)


# --- a planted loud neuron, end to end ------------------------------------------------------------

def planted_model(tokenizer):
    """A tiny 12-layer model whose neuron 13 of layer 9 is loud: a large dt bias and a large output
    column, so that ablating it moves layer 9's output far more than any other neuron's ablation."""
    model = make_model(tokenizer, num_hidden_layers=LAYERS)
    with torch.no_grad():
        mixer = model.backbone.layers[PLANTED_LAYER].mixer
        mixer.dt_proj.bias[PLANTED_NEURON] = 3.0
        mixer.out_proj.weight[:, PLANTED_NEURON] *= 20
    return model


def planted_task(model, tokenizer, path, flipped: int = 24, kept: int = 16):
    """Two-choice questions labelled with the model's own preference: the confident ones that ablating
    the planted neuron flips, and as many that it does not."""
    words = ("the quick brown fox jumps over lazy dog capital France Paris sea poem roof man apples "
             "oranges").split()
    rng = random.Random(0)
    questions = []
    for _ in range(600):
        a, b = rng.sample(words, 2)
        questions.append((" ".join(rng.choice(words) for _ in range(5)), " " + a, " " + b))
    encoded = [encode_pair(tokenizer, context, choice) for context, *choices in questions for choice in choices]
    before, _ = loglikelihoods(model, tokenizer, encoded)
    with steer(model, PLANTED_LAYER, [PLANTED_NEURON], 0.0):
        after, _ = loglikelihoods(model, tokenizer, encoded)
    preferred, ablated = before[1::2] > before[0::2], after[1::2] > after[0::2]
    order = np.argsort(-np.abs(before[1::2] - before[0::2]))
    chosen = ([i for i in order if preferred[i] != ablated[i]][:flipped] +
              [i for i in order if preferred[i] == ablated[i]][:kept])
    with open(path, "w") as f:
        for i in sorted(chosen):
            f.write(json.dumps({"context": questions[i][0], "choices": list(questions[i][1:]),
                                "label": int(preferred[i])}) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    model = planted_model(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    task = planted_task(model, tokenizer, root / "planted.jsonl")
    pile = root / "pile.txt"
    pile.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    return {"root": root, "model": model, "dir": root / "model", "task": task, "pile": pile}


def atlas_run(planted, out, *extra):
    argv = ["--model", planted["dir"], "--device", "cpu", "--tasks", planted["task"], "--pile_path", planted["pile"],
            "--save_path", out / "atlas.json", "--output_dir", out, *extra]
    return run_main("delta_atlas", argv)


@pytest.fixture(scope="module")
def atlas(planted):
    out = planted["root"] / "out"
    assert atlas_run(planted, out, "--verify_top", "2", "--recall_sample", "8", "--step1_layer", str(PLANTED_LAYER),
                     "--save_step1", out / "step1.json") == 0
    return {"out": out, "result": json.loads((out / "atlas.json").read_text()),
            "step1": out / "step1.json"}


def test_planted_neuron_is_found_in_its_layer_and_ranked_first(atlas):
    result = atlas["result"]
    assert [e["layer"] for e in result["layers"]] == list(range(LAYERS))
    ranked = sorted(((e["estimated_impact"][n], e["estimated_margin_loss"][n], e["layer"], n)
                     for e in result["layers"] for n in range(result["neurons_per_layer"])), reverse=True)
    assert ranked[0][2:] == (PLANTED_LAYER, PLANTED_NEURON)
    assert ranked[0][0] > ranked[1][0]  # first by the estimate itself, not by a tie-break
    largest = max((e["largest_verified"]["impact"], e["layer"], e["largest_verified"]["neuron"])
                  for e in result["layers"])
    assert largest[1:] == (PLANTED_LAYER, PLANTED_NEURON) and largest[0] >= 40.0
    record = next(r for r in result["layers"][PLANTED_LAYER]["verified"] if r["neuron"] == PLANTED_NEURON)
    assert is_significant(record["q_value_layer"])  # within its layer; the atlas-wide BH is stricter


def test_exact_remeasurements_equal_whole_model_ablation(atlas, planted, tokenizer):
    """The reference: the neuron zero-ablated in the whole model (steering), every example rescored."""
    model = planted["model"]
    examples = load_examples([str(planted["task"])], None, "discovery", 200)
    baseline = summarize(examples, score_examples(model, tokenizer, examples))["accuracy"]
    assert atlas["result"]["baseline_accuracy"] == baseline
    checked = 0
    for entry in atlas["result"]["layers"]:  # the screen's 2 and the recall sample's, all measured exactly
        assert sum(not r["recall_sample"] for r in entry["verified"]) == 2
        for record in entry["verified"]:
            with steer(model, entry["layer"], [record["neuron"]], 0.0):
                accuracy = summarize(examples, score_examples(model, tokenizer, examples))["accuracy"]
            assert record["accuracy"] == accuracy and record["impact"] == pytest.approx(baseline - accuracy, abs=1e-3)
            checked += 1
    assert checked == 2 * LAYERS + 8


def test_the_recall_sample_is_drawn_from_the_screened_out_neurons_of_every_layer(atlas, capsys):
    result = atlas["result"]
    sample = [[e["layer"], r["neuron"]] for e in result["layers"] for r in e["verified"] if r["recall_sample"]]
    assert len(sample) == 8 and result["recall"]["sample_size"] == 8
    assert result["recall"]["screened_out"] == (result["neurons_per_layer"] - 2) * LAYERS
    significant = [pair for pair in result["significant"] if pair in sample]
    assert result["recall"]["sample_significant"] == significant
    picks = sum(pair not in sample for pair in result["significant"])
    assert result["recall"]["verified_significant"] == picks
    for entry in result["layers"]:  # the screen's picks: its top 2 by estimate; the sample: none of them
        ranked = sorted(range(result["neurons_per_layer"]), key=lambda n: (-entry["estimated_impact"][n],
                                                                          -entry["estimated_margin_loss"][n], n))
        assert {r["neuron"] for r in entry["verified"] if not r["recall_sample"]} == set(ranked[:2])
        assert not {n for layer, n in sample if layer == entry["layer"]} & set(ranked[:2])
    print_atlas(result)
    out = capsys.readouterr().out
    measured = 2 * LAYERS + 8
    assert f"{measured} of {result['neurons_per_layer'] * LAYERS} neurons measured exactly (8 of them at random" in out
    assert "recall of the screen: a random sample of 8 of the" in out


def test_no_largest_neuron_when_every_impact_is_zero(atlas):
    entry = atlas["result"]["layers"][0]
    records = [{**r, "impact": 0.0, "q_value": 1.0} for r in entry["verified"]]
    zero = layer_entry(0, records, [1.0] * len(records), {}, {"delta_variance": [0.0], "dt_pre_mean": [0.0]})
    assert zero["largest_verified"] is None


def test_benjamini_hochberg_runs_over_every_neuron_of_every_layer(atlas):
    result = atlas["result"]
    measured = [r for e in result["layers"] for r in e["verified"]]
    total = result["neurons_per_layer"] * len(result["layers"])
    q_values = benjamini_hochberg([r["p_value"] for r in measured] + [1.0] * (total - len(measured)))
    assert [r["q_value"] for r in measured] == pytest.approx(q_values[:len(measured)])
    assert all(r["q_value"] >= r["q_value_layer"] for r in measured)
    assert sorted(result["significant"]) == sorted([e["layer"], r["neuron"]] for e in result["layers"]
                                                   for r in e["verified"] if is_significant(r["q_value"]))


def test_the_step1_file_of_a_layer_feeds_step_2(atlas, planted):
    discovery = read_discovery(atlas["step1"])
    entry = atlas["result"]["layers"][PLANTED_LAYER]
    assert discovery.layer == PLANTED_LAYER and discovery.tasks == [str(planted["task"])]
    result = atlas["result"]
    assert result["family"] == "mamba" and result["layer"] is None and result["step"] == "atlas"
    assert discovery.provenance.model_digest == result["model_digest"] and discovery.provenance.family == "mamba"
    measured = {r["neuron"]: r for r in discovery.records if r["measured"]}
    assert measured.keys() == {r["neuron"] for r in entry["verified"]}
    assert all(measured[r["neuron"]]["impact"] == r["impact"] and
               measured[r["neuron"]]["q_value"] == r["q_value_layer"] for r in entry["verified"])
    assert PLANTED_NEURON in discovery.groups["high_impact"]
    report = discovery.report
    assert report["minimum_detectable_effect"]["points"] > 0 and report["method"] == "attribution"
    assert "only 2 neurons it picked and" in report["screen"] and report["recall"]["scope"].startswith("the atlas")
    assert report["recall_sample_neurons"] == sorted(r["neuron"] for r in entry["verified"] if r["recall_sample"])
    assert len(discovery.records) == 32 and discovery.dt_pre_mean == entry["dt_pre_mean"]
    out = atlas["out"] / "step2"
    argv = ["--model", planted["dir"], "--device", "cpu", "--output_dir", out, "--factors", "0.5",
            "--max_neurons", "1", "--num_examples", "20", "--no_plots", "--neurons_file", atlas["step1"]]
    assert run_main("step2_steering_factor_determination", argv) == 0
    step2 = json.loads((out / "cluster9_ablation_results_all_neurons.json").read_text())
    assert step2["layer"] == PLANTED_LAYER
    assert step2["step1_screen"].startswith("the step-1 file comes from an attribution screen: only 2 neurons")


def test_the_figure_is_written_as_png_and_svg(atlas):
    for suffix in ("png", "svg"):
        assert (atlas["out"] / f"delta_atlas.{suffix}").stat().st_size > 1000
    assert "Delta atlas" in (atlas["out"] / "delta_atlas.svg").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--step1_layer", "3"], "--step1_layer and --save_step1 go together"),
    (["--layers", "2-4", "--step1_layer", "7", "--save_step1", "x.json"], "--step1_layer 7 is not among"),
    (["--layers", "40"], "--layers 40 out of range"),
    (["--verify_top", "0"], "--verify_top must be at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(planted, tmp_path, capsys, extra, message):
    assert atlas_run(planted, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_families_without_attribution_are_refused_with_one_line(planted, tokenizer, tmp_path, capsys):
    model = make_tiny("mamba2")
    model.save_pretrained(tmp_path / "m2")
    tokenizer.save_pretrained(tmp_path / "m2")
    argv = ["--model", tmp_path / "m2", "--device", "cpu", "--tasks", planted["task"], "--save_path",
            tmp_path / "a.json", "--output_dir", tmp_path]
    assert run_main("delta_atlas", argv) == 2
    err = capsys.readouterr().err.strip()
    assert "attribution, which covers mamba, falcon_mamba models, not mamba2" in err and len(err.splitlines()) == 1
