"""The step files as contracts: what they record, how they are read back, and every boundary that
refuses a mismatched, edited or meaningless input with one line and exit status 2 (before the model
loads wherever the mismatch is visible from the files and the model's config)."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from delta_steering.artifacts import Provenance, content_digest, read_discovery, read_factors, seal
from delta_steering.errors import UsageError
from delta_steering.model.loading import check_model_source
from delta_steering.results_io import RunLock, file_digest
from scripts import one_line, run_main, step1_file, step2_file

OPTIMAL = {"high_impact": {"factor": 5.0, "beats_baseline": True, "selection_best_factor": 5.0, "confirmed": True}}


@pytest.fixture
def files(tiny_model_dir, tmp_path):
    """A step-1 file made at layer 20 of the tiny model, a step-2 file made from it, a task and Pile texts."""
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2})
                            + "\n" for i in range(8)))
    pile = tmp_path / "pile.txt"
    pile.write_text("The quick brown fox.\n\nParis is the capital of France.\n\nA third document.\n\nA fourth.\n")
    step1 = step1_file(tmp_path / "step1.json", {0: 3.0, 1: 2.5, 2: 0.5, 3: -0.5}, 20, tiny_model_dir, 32,
                       tasks=[task])
    step2 = step2_file(tmp_path / "step2.json", step1, [0, 1], OPTIMAL)
    return {"model": tiny_model_dir, "task": task, "pile": pile, "step1": step1, "step2": step2, "dir": tmp_path}


def edited(path, change, name="edited.json", reseal=True):
    """A copy of a step file with `change` applied, sealed again (a consistent file that says
    something else) or not (a hand edit)."""
    data = json.loads(path.read_text())
    change(data)
    out = path.parent / name
    out.write_text(json.dumps(seal(data) if reseal else data))
    return out


def step2(files, out, *extra, step1=None):
    return run_main("step2_steering_factor_determination", [
        "--model", files["model"], "--device", "cpu", "--neurons_file", step1 or files["step1"], "--output_dir", out,
        "--num_examples", "2", "--factors", "2", "--max_neurons", "1", "--no_plots", *extra])


def step3(files, out, *extra, step1=None, step2=None):
    return run_main("step3_steer_performance_verification", [
        "--model", files["model"], "--device", "cpu", "--neurons_file", step1 or files["step1"],
        "--factors_file", step2 or files["step2"], "--output_dir", out, "--no_plots", *extra])


# the files themselves

def test_step_files_round_trip_with_their_provenance(files):
    step1, step2 = read_discovery(files["step1"]), read_factors(files["step2"])
    source = check_model_source(str(files["model"]))
    assert step1.provenance == Provenance(str(files["model"]), source.digest, "mamba", 20)
    assert json.loads(files["step1"].read_text()) == step1.to_json()
    assert step2.provenance.inputs == {"step1_file": {"path": str(files["step1"]), "sha256": file_digest(files["step1"])}}
    assert step2.steering("high_impact")[0].to_json() == {"layer": 20, "neurons": [0, 1], "factor": 5.0}
    assert json.loads(files["step2"].read_text()) == step2.to_json()


def perturbed_copy(model_dir, out):
    """A copy of a model directory with one weight changed by a small amount (its config unchanged)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(model_dir, out)
    weights = load_file(copy / "model.safetensors")
    weights["backbone.layers.3.mixer.out_proj.weight"][0, 0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_the_model_digest_is_a_fingerprint_of_the_weights_not_the_folder(tiny_model_dir, tmp_path):
    import shutil

    digest = check_model_source(str(tiny_model_dir)).digest
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"  # where or how it was saved, not what it is
    (copy / "config.json").write_text(json.dumps(config))
    assert check_model_source(str(copy)).digest == digest
    config["layer_norm_epsilon"] = 1e-3  # the same weights in another model
    (copy / "config.json").write_text(json.dumps(config))
    assert check_model_source(str(copy)).digest != digest
    assert check_model_source(str(perturbed_copy(tiny_model_dir, tmp_path / "perturbed"))).digest != digest


def test_the_fingerprint_of_a_loaded_model_is_its_files_and_samples_large_checkpoints(tiny_model_dir, monkeypatch):
    """In memory (a model loaded some other way) as from the files, whole or by sampled blocks; a
    sampled block that changes changes it."""
    from transformers import AutoModelForCausalLM

    from delta_steering.model import loading

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert loading.source_of(model).digest == check_model_source(str(tiny_model_dir)).digest
    monkeypatch.setattr(loading, "WHOLE_BYTES", 0)  # as for a checkpoint of several GiB
    monkeypatch.setattr(loading, "BLOCK_BYTES", 64)
    sampled = check_model_source(str(tiny_model_dir)).digest
    assert loading.source_of(model).digest == sampled
    weight = model.backbone.layers[3].mixer.in_proj.weight
    spans = loading.fingerprint_spans(weight.nbytes, whole=False)
    assert len(spans) == loading.SAMPLE_BLOCKS and spans[-1][0] + spans[-1][1] == weight.nbytes
    with torch.no_grad():
        weight.view(-1)[spans[5][0] // weight.element_size()] += 1.0
    assert loading.source_of(model).digest != sampled


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(layer=5), "content_sha256"),  # a hand edit
    (lambda d: d.update(format_version=1), "format_version 1"),
    (lambda d: d["groups"]["high_impact"].append("7"), "integer neuron ids"),
    (lambda d: d["groups"]["high_impact"].append(0), "lists neuron 0 twice"),
    (lambda d: d["groups"]["neutral"].append(30), "neuron 30, which all_neuron_impacts lacks"),
    (lambda d: d.update(dt_pre_mean=[0.0]), "dt_pre_mean has 1 entries"),
    (lambda d: d.update(ablation="half"), "ablation is 'half'"),
    (lambda d: d.pop("model_digest"), "no 'model_digest' field"),
])
def test_a_bad_step1_file_is_refused_naming_the_field(files, change, message):
    path = edited(files["step1"], change, reseal=message != "content_sha256")
    with pytest.raises(UsageError, match=message) as caught:
        read_discovery(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0, "5"])
def test_a_step2_file_with_a_meaningless_factor_is_refused(files, value):
    path = edited(files["step2"], lambda d: d["optimal_factors"]["high_impact"].update(factor=value))
    with pytest.raises(UsageError, match="optimal_factors.high_impact.factor"):
        read_factors(path)


def test_swapped_files_are_named_for_what_they_are(files):
    with pytest.raises(UsageError, match="is a step-2 file, not a step-1 file"):
        read_discovery(files["step2"])
    with pytest.raises(UsageError, match="is a step-1 file, not a step-2 file .it goes to --neurons_file"):
        read_factors(files["step1"])


def test_no_bare_nan_is_written(tmp_path):
    from delta_steering.results_io import write_json

    path = write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    assert content_digest({"a": float("nan")}) == content_digest({"a": None})


# boundaries

@pytest.mark.usefixtures("no_model_load")
def test_step2_refuses_a_step1_file_from_another_layer(files, capsys):
    at_19 = step1_file(files["dir"] / "at19.json", {0: 3.0, 1: 0.1}, 19, files["model"], 32, tasks=[files["task"]])
    assert step2(files, files["dir"] / "o", "--layer", "20", step1=at_19) == 2
    line = one_line(capsys)
    assert str(at_19) in line and "field layer is 19, this run's --layer is 20" in line and "--transfer_layer" in line


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(model="state-spaces/mamba-2.8b-hf", model_digest="f" * 64),
     "field model_digest is ffffffffffff... (model 'state-spaces/mamba-2.8b-hf')"),
    (lambda d: d.update(model_digest="f" * 64), "(other weights under the same name)"),
])
def test_step2_refuses_a_step1_file_from_another_model(files, capsys, change, message):
    assert step2(files, files["dir"] / "o", step1=edited(files["step1"], change)) == 2
    line = one_line(capsys)
    assert message in line and "--allow_model_mismatch" in line


@pytest.mark.usefixtures("no_model_load")
def test_a_step2_file_from_other_weights_with_the_same_config_is_refused(files, capsys, tmp_path):
    """A perturbed copy has the same config and parameter shapes: only the weights tell them apart."""
    perturbed = perturbed_copy(files["model"], tmp_path / "perturbed")
    assert step3(files, files["dir"] / "o", "--model", perturbed) == 2
    line = one_line(capsys)
    assert "field model_digest" in line and "another model" in line and "--allow_model_mismatch" in line


def test_the_same_weights_at_another_path_are_a_note_not_a_mismatch(files, capsys, tmp_path, monkeypatch):
    import shutil

    copy = shutil.copytree(files["model"], tmp_path / "elsewhere")
    monkeypatch.chdir(files["model"].parent)  # the same folder named relatively: the same model
    assert step2(files, files["dir"] / "o", "--model", files["model"].name) == 0
    assert "the same weights" not in capsys.readouterr().out
    assert step2(files, files["dir"] / "o-copy", "--model", copy) == 0  # a copy: a note
    assert f"names the model {str(files['model'])!r}, this run's is {str(copy)!r}: the same weights" in \
        capsys.readouterr().out


def test_a_deliberate_layer_transfer_runs_and_is_recorded(files):
    at_19 = step1_file(files["dir"] / "at19.json", {0: 3.0, 1: 0.1}, 19, files["model"], 32, tasks=[files["task"]])
    assert step2(files, files["dir"] / "o", "--layer", "20", "--transfer_layer", step1=at_19) == 0
    saved = json.loads((files["dir"] / "o" / "cluster9_ablation_results_all_neurons.json").read_text())
    assert saved["layer"] == 20 and saved["transferred"] == {"layer": {"from": 19, "to": 20}}
    assert saved["inputs"]["step1_file"]["sha256"] == file_digest(at_19)
    assert read_factors(files["dir"] / "o" / "cluster9_ablation_results_all_neurons.json").layer == 20


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("make,message", [
    (lambda f: edited(f["step2"], lambda d: d.update(model="state-spaces/mamba-2.8b-hf", model_digest="f" * 64)),
     "field model_digest is"),
    (lambda f: edited(f["step2"], lambda d: d.update(layer=5)), "field layer is 5, this run's --layer is 20"),
    (lambda f: edited(f["step2"], lambda d: d["optimal_factors"]["high_impact"].update(factor=7.0), reseal=False),
     "was changed after its step wrote it"),
    (lambda f: edited(f["step2"], lambda d: d["inputs"]["step1_file"].update(sha256="a" * 64)),
     "field inputs.step1_file.sha256 is aaaaaaaaaaaa..."),
])
def test_step3_refuses_a_step2_file_that_does_not_match(files, capsys, make, message):
    assert step3(files, files["dir"] / "o", step2=make(files)) == 2
    assert message in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("factor,message", [("nan", "not a finite number"), ("inf", "not a finite number"),
                                            ("0", "must be > 0"), ("-1", "must be > 0"), ("1", "no steering")])
def test_step3_refuses_meaningless_factors(files, capsys, factor, message):
    assert step3(files, files["dir"] / "o", "--factor", factor) == 2
    assert message in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("factors", ["nan", "2,inf", "0", "-1"])
def test_step2_refuses_meaningless_factors(files, capsys, factors):
    assert step2(files, files["dir"] / "o", "--factors", factors) == 2
    assert "--factors" in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("spec,message", [("20:3:nan", "not a finite number"), ("20:3:-1", "must be >= 0"),
                                          ("20:3,3:2", "names 3 more than once")])
def test_evaluate_steered_refuses_meaningless_steering(files, capsys, spec, message):
    argv = ["--model", files["model"], "--device", "cpu", "--tasks", "piqa", "--output_dir", files["dir"] / "o",
            "--steer", spec]
    assert run_main("evaluate_steered", argv) == 2
    assert message in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
def test_evaluate_steered_checks_the_step2_file_and_names_custom_task_files(files, capsys):
    argv = ["--model", files["model"], "--device", "cpu", "--tasks", "piqa", "--output_dir", files["dir"] / "o"]
    hand_edited = edited(files["step2"], lambda d: d.update(layer=5), reseal=False)
    assert run_main("evaluate_steered", [*argv, "--from_step2", hand_edited]) == 2
    assert "was changed after its step wrote it" in one_line(capsys)
    other = edited(files["step2"], lambda d: d.update(model="state-spaces/mamba-2.8b-hf", model_digest="f" * 64))
    assert run_main("evaluate_steered", [*argv, "--from_step2", other]) == 2
    assert "--allow_model_mismatch" in one_line(capsys)
    files["step1"].write_text(files["step1"].read_text() + "\n")  # the step-1 file it names changed since
    assert run_main("evaluate_steered", [*argv, "--from_step2", files["step2"]]) == 2
    assert "inputs.step1_file.sha256" in one_line(capsys)
    assert run_main("evaluate_steered", [*argv[:4], "--tasks", str(files["task"]), *argv[6:], "--steer", "20:1:2"]) == 2
    assert "lm-eval tasks only" in one_line(capsys)


# the run itself: devices, paths, write failures, a folder in use

@pytest.mark.usefixtures("no_model_load")
def test_unknown_device_and_mistyped_model_path(files, capsys, monkeypatch):
    assert step2(files, files["dir"] / "o", "--device", "tpu") == 2
    assert "unknown --device 'tpu'" in one_line(capsys)
    monkeypatch.chdir(files["model"].parent.parent)  # "models/mamba-tiny-dmeo": a typo, not a Hub id
    assert step2(files, files["dir"] / "o", "--model", f"{files['model'].parent.name}/{files['model'].name}-dmeo") == 2
    assert "local model directory not found" in one_line(capsys)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that refuses new files")
def test_an_output_path_that_passes_access_but_cannot_be_written(files, capsys):
    assert os.access("/proc", os.W_OK)  # as root: the permission bits say yes
    assert step2(files, "/proc/delta_steering_test/out") == 2
    assert "--output_dir /proc/delta_steering_test/out is not writable" in one_line(capsys)
    argv = ["--model", files["model"], "--device", "cpu", "--tasks", files["task"], "--no_plots",
            "--save_path", "/proc/delta_steering_test/d.json", "--output_dir", files["dir"] / "o"]
    assert run_main("step1_neuron_discovery", argv) == 2
    assert "--save_path" in one_line(capsys)


def test_a_full_disk_at_the_end_keeps_the_work_and_says_how_to_finish(files, capsys, monkeypatch):
    from delta_steering import results_io

    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("cluster9_ablation_results_all_neurons.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    out = files["dir"] / "o"
    monkeypatch.setattr(results_io.os, "replace", full_disk)
    assert step2(files, out) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars above, then one line
    line = err[-1]
    assert sum(e.startswith("error: ") for e in err) == 1 and "Traceback" not in "".join(err)
    assert "No space left on device" in line and "step2_checkpoint.json" in line and "rerun the same command" in line
    assert (out / "step2_checkpoint.json").is_file() and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(results_io.os, "replace", real)
    assert step2(files, out) == 0
    assert "resuming" in capsys.readouterr().out and not (out / "step2_checkpoint.json").exists()


def test_a_folder_in_use_is_refused_and_a_dead_lock_taken_over(tmp_path):
    lock = tmp_path / "step2_checkpoint.json.lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import platform

        lock.write_text(f"{platform.node()} {alive.pid}")
        with pytest.raises(UsageError, match=f"in use by another run .process {alive.pid}"):
            RunLock(lock)
    finally:
        alive.kill()
        alive.wait()
    taken = RunLock(lock)  # that process is gone now
    assert lock.read_text() == taken.owner
    taken.release()
    assert not lock.exists()


def test_two_runs_into_one_folder_as_the_shell_would(files):
    """A real second process against a folder whose lock a live process holds: one line, exit 2."""
    import platform

    out = files["dir"] / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "step2_checkpoint.json.lock").write_text(f"{platform.node()} {holder.pid}")
        done = subprocess.run([sys.executable, "step2_steering_factor_determination.py", "--model", str(files["model"]),
                               "--device", "cpu", "--neurons_file", str(files["step1"]), "--output_dir", str(out),
                               "--no_plots"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "in use by another run" in err[0], done.stderr


@pytest.mark.parametrize("case", ["hand_edited_step2", "nan_factor", "layer_mismatch"])
def test_boundaries_as_the_shell_sees_them(files, case):
    """The same refusals from a real process: exit status 2, one line on stderr, no traceback."""
    at_19 = step1_file(files["dir"] / "at19.json", {0: 3.0}, 19, files["model"], 32, tasks=[files["task"]])
    hand_edited = edited(files["step2"], lambda d: d["optimal_factors"]["high_impact"].update(factor=7.0), reseal=False)
    script, extra, message = {
        "hand_edited_step2": ("step3_steer_performance_verification.py", ["--factors_file", hand_edited],
                              "was changed after its step wrote it"),
        "nan_factor": ("step3_steer_performance_verification.py", ["--factor", "nan"], "not a finite number"),
        "layer_mismatch": ("step2_steering_factor_determination.py", ["--neurons_file", at_19, "--layer", "20"],
                           "field layer is 19"),
    }[case]
    argv = ["--model", files["model"], "--device", "cpu", "--output_dir", files["dir"] / "o", "--no_plots"]
    if script.startswith("step3"):
        argv += ["--neurons_file", files["step1"]]
    done = subprocess.run([sys.executable, script, *map(str, argv + extra)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and message in err[0] and "Traceback" not in done.stderr, done.stderr
