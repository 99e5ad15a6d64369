"""The steps as library functions (delta_steering.discover, determine_factors, verify, atlas, export):
each returns its typed contract, equal to the file its script writes for the same options (apart from
the run record), and refuses bad options in one line."""

import json

import pytest

import delta_steering as ds
from delta_steering.artifacts import IN_MEMORY, STEP2_NAME, STEP3_FILES
from delta_steering.results_io import file_digest, write_json
from scripts import run_main
from tiny import near_tie_task

RUN_FIELDS = ("run", "content_sha256")  # what differs between two runs of the same options


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model, tokenizer = ds.load_model(str(tiny_model_dir), "cpu")
    out = tmp_path_factory.mktemp("steps")
    pile = out / "pile.txt"
    pile.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n\n"
                    "Write a poem about the sea, with commas.\n")
    task = near_tie_task(model, tokenizer, out / "near_ties.jsonl")
    common = ["--model", tiny_model_dir, "--device", "cpu", "--pile_path", pile, "--pile_samples", "3"]
    return {"model": model, "tokenizer": tokenizer, "out": out, "pile": str(pile), "task": str(task),
            "common": common}


def without(record: dict, *fields) -> dict:
    return {k: v for k, v in record.items() if k not in RUN_FIELDS + fields}


@pytest.fixture(scope="module")
def discovery(setup):
    return ds.discover(setup["model"], setup["tokenizer"], tasks=[setup["task"]], layer=22, neurons=list(range(6)),
                       validation_size=12, pile_path=setup["pile"], pile_samples=3, seed=0)


@pytest.fixture(scope="module")
def step1_path(setup):
    path = setup["out"] / "step1.json"
    assert run_main("step1_neuron_discovery", [
        *setup["common"], "--tasks", setup["task"], "--layer", "22", "--neurons", "0-5", "--validation_size", "12",
        "--save_path", path, "--output_dir", setup["out"] / "s1", "--no_plots"]) == 0
    return path


def test_discover_returns_the_step1_file(discovery, step1_path):
    assert isinstance(discovery, ds.Discovery)
    assert without(discovery.to_json()) == without(json.loads(step1_path.read_text()))
    assert [r["neuron"] for r in discovery.records] == [r["neuron"] for r in ds.artifacts.read_discovery(
        step1_path).records]


def test_determine_factors_returns_the_step2_file(setup, discovery, step1_path):
    factors = ds.determine_factors(setup["model"], setup["tokenizer"], discovery, factors=[2.0, 5.0],
                                   num_examples=12, max_neurons=2, seed=0)
    out = setup["out"] / "s2"
    assert run_main("step2_steering_factor_determination", [
        *setup["common"], "--neurons_file", step1_path, "--factors", "2,5", "--num_examples", "12",
        "--max_neurons", "2", "--output_dir", out, "--no_plots"]) == 0
    written = json.loads((out / STEP2_NAME).read_text())
    api = factors.to_json()
    assert isinstance(factors, ds.Factors) and api["optimal_factors"] == written["optimal_factors"]
    assert without(api, "inputs") == without(written, "inputs")
    # the step-1 contract passed in memory is recorded by the digest its file has once written
    saved = write_json(setup["out"] / "api_step1.json", discovery.to_json())
    assert api["inputs"]["step1_file"] == {"path": IN_MEMORY, "sha256": file_digest(saved)}


@pytest.mark.usefixtures("punkt")
def test_verify_returns_the_step3_files(setup, discovery, step1_path):
    prompts = setup["out"] / "ifeval.jsonl"
    prompts.write_text(json.dumps({"key": 1, "prompt": "Write about the sea.", "instruction_id_list":
                                   ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    verification = ds.verify(setup["model"], setup["tokenizer"], discovery, factor=2.0, modes=["combined"],
                             num_samples=1, max_new_tokens=4, ifeval_path=str(prompts), pile_path=setup["pile"],
                             pile_samples=3, seed=0)
    out = setup["out"] / "s3"
    assert run_main("step3_steer_performance_verification", [
        *setup["common"], "--neurons_file", step1_path, "--factor", "2", "--combined", "--num_samples", "1",
        "--max_new_tokens", "4", "--ifeval_path", prompts, "--output_dir", out, "--no_plots"]) == 0
    written = json.loads((out / STEP3_FILES["combined"]).read_text())
    api = verification.to_json()["combined"]
    for result in (api, written):
        for entry in result["configurations"]:
            del entry["seconds"]  # the time each configuration took
    assert isinstance(verification, ds.Verification)
    assert without(api, "inputs") == without(written, "inputs")
    responses = [json.loads(line) for line in (out / "responses_baseline.jsonl").read_text().splitlines()]
    assert verification.responses["baseline"] == responses


def test_export_writes_the_scripts_checkpoint(setup, tiny_model_dir, tmp_path):
    steering = ds.Steering(22, ds.Intervention.scale([1, 4], 3.0))
    record = ds.export(setup["model"], setup["tokenizer"], out=tmp_path / "api", steer=[steering])
    assert run_main("export_steered_model", ["--model", tiny_model_dir, "--steer", "22:1,4:3",
                                             "--out", tmp_path / "script"]) == 0
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (tmp_path / "script" / "model.safetensors"
                                                                      ).read_bytes()
    assert record == json.loads((tmp_path / "script" / "steering.json").read_text())


def test_bad_options_are_one_line_errors(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    with pytest.raises(ds.UsageError, match="unknown option 'neuron'"):
        ds.discover(model, tokenizer, tasks=[setup["task"]], neuron=[1])
    with pytest.raises(ds.UsageError, match="--neurons: neuron 999 out of range"):
        ds.discover(model, tokenizer, tasks=[setup["task"]], neurons=[999], validation_size=2)
    with pytest.raises(ds.UsageError, match="--factors: factor nan is not a finite number"):
        ds.determine_factors(model, tokenizer, factors=[float("nan")])


@pytest.mark.usefixtures("punkt")
def test_every_figure_is_drawn_from_the_steps_own_output(setup, discovery, tmp_path):
    """The figures read the contracts the steps return, not hand-written dicts: a renamed report key
    fails here. Every figure of steps 1-3 is drawn (perplexity and layer ablation included)."""
    from delta_steering.analysis.plots import plot_discovery, plot_factors, plot_verification

    model, tokenizer, pile = setup["model"], setup["tokenizer"], setup["pile"]
    factors = ds.determine_factors(model, tokenizer, discovery, factors=[2.0], num_examples=8, max_neurons=2,
                                   perplexity_ablation=True, perplexity_layers=[21, 22], pile_path=pile,
                                   pile_samples=3, seed=0)
    prompts = tmp_path / "ifeval.jsonl"
    prompts.write_text(json.dumps({"key": 1, "prompt": "Write about the sea.", "instruction_id_list":
                                   ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    verification = ds.verify(model, tokenizer, discovery, factor=2.0, modes=["combined", "layer_ablation"],
                             layers=[21, 22], num_samples=1, max_new_tokens=2, ifeval_path=str(prompts),
                             pile_path=pile, pile_samples=3, seed=0)
    paths = [*plot_discovery(discovery.to_json(), tmp_path), *plot_factors(factors.to_json(), tmp_path),
             *plot_verification(verification.to_json(), tmp_path)]
    stems = {"impact_ranked_L22", "impact_histogram_L22", "variance_vs_impact_L22", "accuracy_vs_factor",
             "step1_vs_heldout_impact", "combined_configurations", "layer_ablation_configurations",
             "layer_ablation_vs_layer"}
    if factors.groups["high_impact"]["neurons"]:  # perplexity by layer steers the High Impact group
        stems.add("perplexity_vs_layer")
    assert sorted(p.name for p in paths) == sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
