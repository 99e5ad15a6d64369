"""Sharing a step's work between processes: torchrun (gloo on CPU) and --shard/--merge give the JSON a
single process gives; shards from other arguments or incomplete sets are refused with one line."""

import json
import os
import subprocess
import sys

import pytest

from delta_steering.cli import UsageError
from delta_steering.distributed import Workers, parse_shard, read_shards, start_workers, write_shard
from scripts import interrupting, run_main, step1_file
from test_step3 import PROMPTS
from tiny import near_tie_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, argv: list, nltk_data=None) -> subprocess.CompletedProcess:
    """The script under `torchrun --nproc_per_node=2` on CPU, as a user launches it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"NLTK_DATA": str(nltk_data)} if nltk_data else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *map(str, argv)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def without_run(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("run", "content_sha256")}


def test_workers_deal_items_round_robin():
    items = list(range(7))
    shares = [Workers(rank, 3, "shard").share(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert Workers().share(items) == items and Workers().writes_outputs
    assert not Workers(0, 2, "shard").writes_outputs and not Workers(1, 2, "torchrun").writes_outputs
    assert Workers(0, 2, "torchrun").writes_outputs
    assert Workers(1, 2, "torchrun").checkpoint_file("out", "step1").name == "step1_checkpoint.1of2.json"


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3", "0/0"])
def test_malformed_shard_is_refused(text):
    with pytest.raises(UsageError, match="malformed --shard"):
        parse_shard(text)


def test_shard_and_merge_exclude_each_other():
    with pytest.raises(UsageError, match="exclude each other"):
        start_workers("0/2", [], "cpu")


def test_merge_refuses_other_arguments_and_incomplete_sets(tmp_path):
    fingerprint = {"layer": 20, "tasks": "a"}
    write_shard(tmp_path, "step9", Workers(0, 3, "shard"), fingerprint, {"c": 1}, {"x": 1})
    write_shard(tmp_path, "step9", Workers(2, 3, "shard"), fingerprint, {"c": 1}, {"z": 3})
    with pytest.raises(UsageError, match=r"shards 0/3, 2/3 are not one complete set"):
        read_shards([], tmp_path, "step9", fingerprint)
    write_shard(tmp_path, "step9", Workers(1, 3, "shard"), {**fingerprint, "layer": 19}, {"c": 1}, {"y": 2})
    with pytest.raises(UsageError, match=r"different arguments \(layer\)"):
        read_shards([], tmp_path, "step9", fingerprint)
    write_shard(tmp_path, "step9", Workers(1, 3, "shard"), fingerprint, {"c": 1}, {"y": 2})
    assert read_shards([], tmp_path, "step9", fingerprint) == ({"c": 1}, {"x": 1, "y": 2, "z": 3})
    with pytest.raises(UsageError, match="no step8 shard files"):
        read_shards([], tmp_path, "step8", fingerprint)


def test_merge_checks_the_inputs_it_knows_and_that_the_shards_agree_on_the_rest(tmp_path):
    """A merge loads no model: it compares the shards' task files with its own, and the shards' model
    fingerprints with each other."""
    ours = {"layer": 20, "inputs": {"task file t.jsonl": "a" * 64}}
    shard = {**ours, "inputs": {**ours["inputs"], "the model's weights": "b" * 64}}
    write_shard(tmp_path, "step9", Workers(0, 2, "shard"), shard, {}, {"x": 1})
    write_shard(tmp_path, "step9", Workers(1, 2, "shard"), shard, {}, {"y": 2})
    assert read_shards([], tmp_path, "step9", ours)[1] == {"x": 1, "y": 2}
    other_model = {**shard, "inputs": {**shard["inputs"], "the model's weights": "c" * 64}}
    write_shard(tmp_path, "step9", Workers(1, 2, "shard"), other_model, {}, {"y": 2})
    with pytest.raises(UsageError, match="step9.shard1of2.json comes from a run with another version of the model's "
                                         "weights .SHA-256 cccccccccccc... then, bbbbbbbbbbbb... now"):
        read_shards([], tmp_path, "step9", ours)
    with pytest.raises(UsageError, match="another version of task file t.jsonl"):
        read_shards([], tmp_path, "step9", {**ours, "inputs": {"task file t.jsonl": "d" * 64}})


@pytest.fixture(scope="module")
def step1_setup(tiny_model_dir, tmp_path_factory):
    from mamba_model_loader import load_mamba_model

    root = tmp_path_factory.mktemp("distributed-step1")
    model, tokenizer = load_mamba_model(str(tiny_model_dir), "cpu")
    task = near_tie_task(model, tokenizer, root / "near_ties.jsonl", n=16)
    (root / "pile.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    return root, ["--model", tiny_model_dir, "--tasks", task, "--device", "cpu", "--pile_path", root / "pile.txt",
                  "--layer", "23", "--neurons", "0-31", "--chunk_neurons", "8", "--no_plots"]


def step1_argv(common, out, *extra):
    return [*common, "--save_path", out / "out.json", "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def step1_single(step1_setup):
    root, common = step1_setup
    assert run_main("step1_neuron_discovery", step1_argv(common, root / "single")) == 0
    return without_run(root / "single" / "out.json")


def test_step1_under_torchrun_equals_one_process(step1_setup, step1_single):
    root, common = step1_setup
    done = torchrun("step1_neuron_discovery.py", step1_argv(common, root / "torchrun"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert without_run(root / "torchrun" / "out.json") == step1_single
    assert not list((root / "torchrun").glob("step1_checkpoint*"))  # every rank's checkpoint is gone


def test_step1_shards_merge_to_one_process(step1_setup, step1_single):
    root, common = step1_setup
    out = root / "shards"
    for shard in ("0/2", "1/2"):
        assert run_main("step1_neuron_discovery", step1_argv(common, out, "--shard", shard)) == 0
    assert not (out / "out.json").exists() and len(list((out / "shards").glob("step1.shard*of2.json"))) == 2
    assert run_main("step1_neuron_discovery", step1_argv(common, out, "--merge")) == 0
    assert without_run(out / "out.json") == step1_single


def test_step1_shard_resumes_from_its_own_checkpoint(step1_setup, step1_single, tmp_path, monkeypatch):
    from delta_steering.steps import discover

    root, common = step1_setup
    real = discover.sweep_correctness
    monkeypatch.setattr(discover, "sweep_correctness", interrupting(real, on_call=2))
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path, "--shard", "1/2")) == 130
    saved = json.loads((tmp_path / "step1_checkpoint.1of2.json").read_text())
    assert sorted(r["neuron"] for done in saved["done"].values() for r in done) == list(range(8, 16))  # chunk 1 of 1, 3
    monkeypatch.setattr(discover, "sweep_correctness", real)
    for shard in ("1/2", "0/2"):
        assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path, "--shard", shard)) == 0
    assert not list(tmp_path.glob("step1_checkpoint*"))
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path, "--merge")) == 0
    assert without_run(tmp_path / "out.json") == step1_single


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes(step1_setup, step1_single, tmp_path, monkeypatch,
                                                                capsys):
    """The checkpoint cannot be saved after the second chunk: one line; once it can, the same command
    resumes from the first chunk and gives the uninterrupted result."""
    import errno

    from delta_steering import results_io

    root, common = step1_setup
    real, saves = os.replace, []

    def full_after_one(src, dst):
        if str(dst).endswith("step1_checkpoint.json"):
            saves.append(dst)
            if len(saves) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(results_io.os, "replace", full_after_one)
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in line and "rerun the same command" in line and "Traceback" not in line
    assert not list(tmp_path.glob(".*.tmp"))  # the lock is released at exit (in a test, taken over by the rerun)
    monkeypatch.setattr(results_io.os, "replace", real)
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path)) == 0
    assert "resuming: 1 of 4 chunks done" in capsys.readouterr().out
    assert without_run(tmp_path / "out.json") == step1_single


def test_step1_merge_refuses_shards_of_other_arguments(step1_setup, tmp_path, capsys):
    root, common = step1_setup
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path, "--shard", "0/2")) == 0
    other = [*common, "--layer", "22"]  # argparse keeps the last --layer
    assert run_main("step1_neuron_discovery", step1_argv(other, tmp_path, "--shard", "1/2")) == 0
    capsys.readouterr()
    assert run_main("step1_neuron_discovery", step1_argv(common, tmp_path, "--merge")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different arguments (layer)" in err


def test_step2_under_torchrun_and_in_shards_equals_one_process(step1_setup, step1_single, tmp_path):
    root, common = step1_setup
    step1_file = tmp_path / "step1.json"
    step1_file.write_text((root / "single" / "out.json").read_text())
    argv = ["--model", common[1], "--device", "cpu", "--neurons_file", step1_file, "--factors", "0.5,3",
            "--chunk_neurons", "4", "--max_neurons", "10", "--perplexity_ablation", "--perplexity_layers", "22,23",
            "--pile_path", root / "pile.txt", "--no_plots"]
    name = "cluster9_ablation_results_all_neurons.json"
    assert run_main("step2_steering_factor_determination", [*argv, "--output_dir", tmp_path / "single"]) == 0
    for shard in ("0/3", "1/3", "2/3"):
        assert run_main("step2_steering_factor_determination", [*argv, "--output_dir", tmp_path, "--shard", shard]) == 0
    assert run_main("step2_steering_factor_determination", [*argv, "--output_dir", tmp_path, "--merge"]) == 0
    done = torchrun("step2_steering_factor_determination.py", [*argv, "--output_dir", tmp_path / "torchrun"])
    assert done.returncode == 0, done.stderr[-2000:]
    single = without_run(tmp_path / "single" / name)
    assert without_run(tmp_path / name) == single
    assert without_run(tmp_path / "torchrun" / name) == single
    assert single["perplexity"]["layers"] and len(single["importance_ranking"]["neurons"]) == 10


@pytest.fixture(scope="module")
def step3_setup(tiny_model_dir, tmp_path_factory, punkt):
    root = tmp_path_factory.mktemp("distributed-step3")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"key": k, "prompt": p, "instruction_id_list": i,
                                                            "kwargs": kw}) + "\n" for k, p, i, kw in PROMPTS))
    impacts = {**{n: 3.0 + n for n in range(4)}, **{n: 0.1 for n in range(4, 32)}}
    step1_file(root / "step1.json", impacts, 20, tiny_model_dir, 32, variance=[float(n) for n in range(32)])
    (root / "pile.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    argv = ["--model", tiny_model_dir, "--device", "cpu", "--neurons_file", root / "step1.json", "--factor", "5",
            "--ifeval_path", root / "prompts.jsonl", "--num_samples", "5", "--max_new_tokens", "16",
            "--pile_path", root / "pile.txt", "--both", "--layers", "19,21", "--no_plots"]
    assert run_main("step3_steer_performance_verification", [*argv, "--output_dir", root / "single"]) == 0
    return root, argv, punkt


STEP3_OUTPUTS = ("cluster_ablation_ifeval_results.json", "layer_ablation_ifeval_results.json")


def same_step3_outputs(out, single) -> None:
    for name in STEP3_OUTPUTS:
        assert without_run(out / name) == single_with_their_seconds(single / name, out / name)
    for responses in single.glob("responses_*.jsonl"):
        assert (out / responses.name).read_text() == responses.read_text()


def single_with_their_seconds(single_path, other_path) -> dict:
    """The single-process JSON with each configuration's wall time taken from the other run."""
    single, other = without_run(single_path), without_run(other_path)
    for mine, theirs in zip(single["configurations"], other["configurations"]):
        mine["seconds"] = theirs["seconds"]
    return single


def test_step3_both_under_torchrun_equals_one_process(step3_setup):
    root, argv, punkt = step3_setup
    done = torchrun("step3_steer_performance_verification.py", [*argv, "--output_dir", root / "torchrun"], punkt)
    assert done.returncode == 0, done.stderr[-2000:]
    same_step3_outputs(root / "torchrun", root / "single")


def test_step3_both_shards_merge_to_one_process(step3_setup):
    root, argv, _ = step3_setup
    out = root / "shards"
    for shard in ("0/2", "1/2"):
        assert run_main("step3_steer_performance_verification", [*argv, "--output_dir", out, "--shard", shard]) == 0
    assert not (out / STEP3_OUTPUTS[0]).exists()
    assert run_main("step3_steer_performance_verification", [*argv, "--output_dir", out, "--merge"]) == 0
    same_step3_outputs(out, root / "single")
