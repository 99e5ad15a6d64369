"""evaluate_steered.py end to end on a tiny model with local task files: lm-eval's results for both
runs, the comparison with the steering specification, a generative benchmark, and bad input."""

import copy
import json

import pytest

from delta_steering.results_io import file_digest

from scripts import run_main, step1_file, step2_file
from test_harness import write_piqa


def write_gsm8k(folder, n=2):
    (folder / "gsm8k").mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"} for i in range(n)]
    (folder / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def evaluate(tiny_model_dir, out, *extra):
    return run_main("evaluate_steered", ["--model", tiny_model_dir, "--device", "cpu", "--output_dir", out,
                                         "--batch_size", "4", *extra])


def test_steered_against_unsteered_with_a_generative_benchmark(tiny_model_dir, tmp_path, capsys):
    data = write_piqa(tmp_path / "data")
    write_gsm8k(data)
    assert evaluate(tiny_model_dir, tmp_path / "out", "--tasks", "piqa,gsm8k", "--data_dir", data, "--num_fewshot",
                    "0", "--limit", "2", "--gen_kwargs", "max_gen_toks=8", "--steer", "20:0-15:0.1",
                    "--steer", "22:3:4") == 0
    out = tmp_path / "out"
    plain, steered = (json.loads((out / f"{n}_results.json").read_text()) for n in ("unsteered", "steered"))
    assert set(plain["results"]) == set(steered["results"]) == {"piqa", "gsm8k"}
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["steering"] == [{"layer": 20, "neurons": list(range(16)), "factor": 0.1},
                                      {"layer": 22, "neurons": [3], "factor": 4.0}]
    piqa = comparison["tasks"]["piqa"]["acc,none"]
    assert piqa["unsteered"] == plain["results"]["piqa"]["acc,none"] and piqa["n"] == 2
    assert piqa["steered"] == steered["results"]["piqa"]["acc,none"]
    assert piqa["delta"] == pytest.approx(piqa["steered"] - piqa["unsteered"], abs=1e-4)
    assert "exact_match,strict-match" in comparison["tasks"]["gsm8k"]
    assert "acc,none" in capsys.readouterr().out


def test_a_model_offloaded_to_disk_gives_the_results_of_the_model_in_memory(tiny_model_dir, tmp_path):
    """lm-eval's log-likelihoods and generation, on blocks read from disk at each forward."""
    data = write_piqa(tmp_path / "data")
    write_gsm8k(data)
    common = ["--tasks", "piqa,gsm8k", "--data_dir", data, "--num_fewshot", "0", "--limit", "2", "--gen_kwargs",
              "max_gen_toks=8", "--steer", "20:0-15:0.1"]
    assert evaluate(tiny_model_dir, tmp_path / "memory", *common) == 0
    assert evaluate(tiny_model_dir, tmp_path / "disk", *common, "--device", "auto", "--max_memory", "cpu=40KB",
                    "--offload_folder", tmp_path / "offload") == 0
    memory, disk = (json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("memory", "disk"))
    assert disk["tasks"] == memory["tasks"] and disk["steering"] == memory["steering"]


def test_from_step2_steers_the_high_impact_group(tiny_model_dir, tmp_path, capsys):
    data = write_piqa(tmp_path / "data")
    step1 = step1_file(tmp_path / "step1.json", {1: 3.0, 2: 2.5, 3: 0.0}, 21, tiny_model_dir, 32)
    step2 = step2_file(tmp_path / "step2.json", step1, [1, 2], {"high_impact": {
        "factor": 1.0, "beats_baseline": False, "selection_best_factor": 3.0, "confirmed": False}})
    assert evaluate(tiny_model_dir, tmp_path / "out", "--tasks", "piqa", "--data_dir", data, "--limit", "2",
                    "--from_step2", step2) == 0
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert comparison["steering"] == [{"layer": 21, "neurons": [1, 2], "factor": 3.0}]
    assert comparison["factor_source"] == "step2-unconfirmed" and "unconfirmed" in capsys.readouterr().out
    assert comparison["inputs"]["step2_file"]["sha256"] == file_digest(step2) and comparison["layer"] == 21


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "piqa"], "give --steer"),
    (["--tasks", "piqa", "--steer", "20:1-3"], "malformed --steer '20:1-3'"),
    (["--tasks", "piqa", "--steer", "20:40:2"], "neuron 40 out of range"),
    (["--tasks", "piqa", "--steer", "24:1:2"], "--steer layer 24 out of range"),
    (["--tasks", "no_such_benchmark", "--steer", "20:1:2"], "unknown task 'no_such_benchmark'"),
])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    assert evaluate(tiny_model_dir, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_tokenizer_without_bos_or_eos_exits_2_with_one_line(tiny_model_dir, tokenizer, tmp_path, capsys):
    """lm-eval would fail deep inside with a TypeError (None as a token id); the run says why at once."""
    bare = tmp_path / "bare_tokenizer"
    plain = copy.deepcopy(tokenizer)
    plain.bos_token = plain.eos_token = None
    plain.save_pretrained(bare)
    data = write_piqa(tmp_path / "data")
    assert evaluate(tiny_model_dir, tmp_path / "out", "--tokenizer", bare, "--tasks", "piqa", "--data_dir", data,
                    "--limit", "2", "--steer", "20:1:2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the tokenizer has neither a BOS nor an EOS token" in err[0], err
    assert not (tmp_path / "out").exists()  # refused after the folder was locked: the folder goes too
