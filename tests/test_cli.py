"""What a user meets first: --help fast and complete, and mistakes (paths, arguments) caught with one
line and exit status 2 before the model is loaded, with nothing lost."""

import importlib
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from delta_steering.errors import UsageError
from scripts import one_line, run_main, step1_file

SCRIPTS = ("step1_neuron_discovery", "step2_steering_factor_determination", "step3_steer_performance_verification")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(script):
    parser = importlib.import_module(script).build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options and all(a.help and a.help.strip() for a in options), [a.dest for a in options if not a.help]
    text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    for action in options:
        if action.default is not None and action.nargs != 0:
            assert "".join(f"(default: {action.default})".split()) in text, action.dest


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_option_without_a_default_says_what_happens_once(script):
    text = importlib.import_module(script).build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(None:" not in text


def test_help_defines_the_groups_and_the_options_a_newcomer_asks_about():
    def help_of(script):
        return " ".join(importlib.import_module(script).build_parser().format_help().split())

    step1, step2 = help_of(SCRIPTS[0]), help_of(SCRIPTS[1])
    assert "A delta neuron is one channel" in step1
    assert "High Impact group: impact > POINTS; Neutral group: |impact| <= POINTS" in step1
    assert "--high_impact_cut POINTS" in step1 and "(default: 2.0)" in step1
    assert "--validation_size VALIDATION_SIZE discovery examples per task" in step1
    assert "re-measure on held-out examples only the N step-1 neurons of largest |impact|" in step2
    step3 = help_of(SCRIPTS[2])
    assert "--cluster_ablation and --layer_ablation, not --combined" in step3
    assert "amplified by the factor at each of --layers" in step3


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    code = f"import sys, {script} as s; s.build_parser().format_help(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr
    started = time.monotonic()
    done = subprocess.run([sys.executable, f"{script}.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "--model" in done.stdout
    assert time.monotonic() - started < 10  # generous: about 0.3 s on an idle machine


@pytest.fixture
def inputs(tiny_model_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2})
                            + "\n" for i in range(6)))
    pile = tmp_path / "pile.txt"
    pile.write_text("The quick brown fox.\n\nParis is the capital of France.\n")
    return {"model": tiny_model_dir, "task": task, "pile": pile,
            "step1": step1_file(tmp_path / "d.json", {0: 3.0, 1: 0.5}, 23, tiny_model_dir, 32)}


def step1(inputs, out, *extra):
    return ["--model", inputs["model"], "--device", "cpu", "--tasks", inputs["task"], "--pile_path", inputs["pile"],
            "--save_path", out / "d.json", "--output_dir", out, "--no_plots", *extra]


@pytest.mark.usefixtures("no_model_load")
def test_output_paths_are_checked_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("keep me")
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), "--output_dir", tmp_path / "a_file"]) == 2
    assert "--output_dir" in one_line(capsys) and (tmp_path / "a_file").read_text() == "keep me"
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), "--save_path", tmp_path / "a_file" / "d.json"]) == 2
    assert "--save_path" in one_line(capsys)
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), "--save_path", tmp_path]) == 2
    assert "is a folder" in one_line(capsys)
    from pathlib import Path

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_write = Path.write_bytes

    def refuse_in_read_only(path, data):
        if path.parent == read_only:
            raise PermissionError(13, "Permission denied")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", refuse_in_read_only)  # root may write anywhere: simulated
    assert run_main(SCRIPTS[0], step1(inputs, read_only)) == 2
    assert "not writable (Permission denied)" in one_line(capsys)
    args = ["--model", inputs["model"], "--device", "cpu", "--neurons_file", inputs["step1"], "--no_plots"]
    assert run_main(SCRIPTS[1], [*args, "--output_dir", tmp_path / "a_file"]) == 2
    assert "--output_dir" in one_line(capsys)
    assert run_main(SCRIPTS[2], [*args, "--factor", "2", "--output_dir", tmp_path / "a_file" / "x"]) == 2
    assert "--output_dir" in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("extra,message", [
    (["--layer", "24"], "--layer 24 out of range"),
    (["--neurons", "0-40"], "neuron 32 out of range"),
    (["--pile_path", "/no/such/pile.txt"], "Pile path not found"),
    (["--tasks", "lambada_openai", "--model", "./models/mamba_trained_on_pile"], "local model directory not found"),
    (["--tasks", ""], "--tasks names no task"),
    (["--tasks", ","], "--tasks names no task"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-4"], "--batch_size must be at least 1, got -4"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
])
def test_step1_mistakes_are_reported_before_the_model_loads(inputs, tmp_path, capsys, extra, message):
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), *extra]) == 2
    assert message in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("extra,message", [
    (["--layer", "30"], "--layer 30 out of range"),
    (["--perplexity_ablation", "--perplexity_layers", "40"], "--perplexity_layers 40 out of range"),
    (["--factors", "0,2"], "--factors: factor 0.0 must be > 0"),
    (["--sample_neurons", "5", "--max_neurons", "5"], "--max_neurons and --sample_neurons exclude each other"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_step2_mistakes_are_reported_before_the_model_loads(inputs, tmp_path, capsys, extra, message):
    args = ["--model", inputs["model"], "--device", "cpu", "--neurons_file", inputs["step1"], "--tasks", inputs["task"],
            "--output_dir", tmp_path, "--no_plots", *extra]
    assert run_main(SCRIPTS[1], args) == 2
    assert message in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
def test_a_task_twice_or_a_directory_as_a_file_is_one_line(inputs, tmp_path, capsys):
    task = inputs["task"]
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), "--tasks", f"{task},{task}"]) == 2
    assert f"--tasks names task {task} twice" in one_line(capsys)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    assert run_main(SCRIPTS[0], [*step1(inputs, tmp_path), "--tasks", folder]) == 2
    assert f"task file {folder} is a directory" in one_line(capsys)
    args = ["--model", inputs["model"], "--device", "cpu", "--output_dir", tmp_path / "o", "--no_plots"]
    assert run_main(SCRIPTS[1], [*args, "--neurons_file", tmp_path]) == 2
    assert f"--neurons_file {tmp_path} is a directory, not a step-1 file" in one_line(capsys)
    assert run_main(SCRIPTS[2], [*args, "--neurons_file", inputs["step1"], "--factors_file", tmp_path]) == 2
    assert f"{tmp_path} is a directory, not a step-2 file" in one_line(capsys)
    assert run_main(SCRIPTS[2], [*args, "--neurons_file", inputs["step1"], "--factor", "2", "--layer_ablation",
                                 "--layers", "20-30"]) == 2
    assert "--layers 24 out of range: the model has layers 0-23" in one_line(capsys)
    assert run_main("pile_dataset_loader", ["--num_samples", "0", "--pile_path", inputs["pile"]]) == 2
    assert "--num_samples must be at least 1, got 0" in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
def test_step3_names_a_missing_prompt_file_before_nltk(inputs, tmp_path, capsys, monkeypatch):
    from delta_steering.data import ifeval

    def no_punkt():
        raise ifeval.UsageError("NLTK's punkt_tab tokenizer is not installed")

    monkeypatch.setattr(ifeval, "ensure_punkt", no_punkt)
    args = ["--model", inputs["model"], "--device", "cpu", "--neurons_file", inputs["step1"], "--factor", "2",
            "--ifeval_path", tmp_path / "missing.jsonl", "--output_dir", tmp_path, "--no_plots"]
    assert run_main(SCRIPTS[2], args) == 2
    assert "IFEval file not found" in one_line(capsys)
    assert run_main(SCRIPTS[2], [*args[:-5], "--layers", "40", "--layer_ablation", *args[-5:]]) == 2
    assert "--layers 40" in one_line(capsys)


def test_max_memory_entries_parse_as_accelerate_reads_them():
    from delta_steering.cli import parse_max_memory

    assert parse_max_memory("0=70GiB, cpu=100GiB") == {0: 70 * 2**30, "cpu": 100 * 2**30}
    assert parse_max_memory("cuda:1=1.5GB,cpu=40KB") == {1: 1_500_000_000, "cpu": 40_000}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}
    for text, message in [("cpu", "malformed --max_memory entry 'cpu'"), ("disk=1GB", "disk is --offload_folder"),
                          ("cpu=1XB", "'1XB' is not a size"), ("cpu=-1GB", "not a size"),
                          ("cpu=1GB,cpu=2GB", "names cpu twice"), (",", "names no device")]:
        with pytest.raises(UsageError, match=message):
            parse_max_memory(text)


def test_a_malformed_max_memory_exits_2_before_any_work(tmp_path, capsys):
    assert run_main("step1_neuron_discovery", ["--save_path", tmp_path / "d.json", "--max_memory", "gpu=1GB"]) == 2
    assert "malformed --max_memory entry 'gpu=1GB'" in capsys.readouterr().err
