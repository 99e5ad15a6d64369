"""Exported steered checkpoints: loaded by plain transformers in a process that imports nothing of this
project, they give the logits of `steer(...)` on the source model bit for bit (float32, and in the
source's half dtype), on every family the project steers; unsteered tensors byte-identical; undo
exact; tied sites and bad inputs refused with one line."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_steering.errors import UsageError
from delta_steering.model.export import edited_parameters
from delta_steering.intervention import Intervention, Steering
from delta_steering.model.sites import ssm_layers
from delta_steering.model.steering import apply
from families import TINY, make_tiny
from delta_steering.results_io import file_digest
from scripts import one_line, run_main, step1_file, step2_file
from tiny import make_model

IDS = torch.tensor([[5, 17, 3, 42, 8, 99, 23, 61, 7, 12, 30, 2]])
PLAIN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor({ids})
    for directory in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids, use_cache=False).logits, directory + "/logits.pt")
    assert not any(name.startswith("delta_steering") for name in sys.modules), "the project was imported"
""").format(ids=IDS.tolist())


def plain_logits(directories) -> list[torch.Tensor]:
    """Each directory's logits on IDS from a fresh interpreter that never imports this project."""
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, *map(str, directories)], check=True, cwd="/",
                   capture_output=True, text=True)
    return [torch.load(f"{d}/logits.pt") for d in directories]


def save_source(model, tokenizer, directory, dtype=torch.float32):
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def steering_args(model) -> tuple[list[str], list[Steering]]:
    """Two layers steered: three neurons by 5 and one by 0.5 at the last SSM layer, one zero-ablated at the first."""
    first, last = ssm_layers(model)[0], ssm_layers(model)[-1]
    args = ["--steer", f"{last}:0,2-3:5", "--steer", f"{last}:1:0.5", "--steer", f"{first}:1:0"]
    return args, [Steering(last, Intervention.scale([0, 2, 3], 5.0)), Steering(last, Intervention.scale([1], 0.5)),
                  Steering(first, Intervention.scale([1], 0.0))]


def export(source, out, *args):
    return run_main("export_steered_model", ["--model", source, "--out", out, *args])


def steered_logits(model, steerings) -> torch.Tensor:
    with apply(model, steerings), torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """Every family the project steers, plus the tests' 24-layer Mamba: source and exported directories."""
    root = tmp_path_factory.mktemp("export")
    cases = {name: make_tiny(name) for name in TINY}
    cases["mamba-24"] = make_model(tokenizer)
    out = {}
    for name, model in cases.items():
        source = save_source(model, tokenizer, root / name)
        args, steerings = steering_args(model)
        assert export(source, root / f"{name}-steered", *args) == 0
        out[name] = {"source": source, "out": root / f"{name}-steered", "steerings": steerings}
    for case, logits in zip(out.values(), plain_logits([case["out"] for case in out.values()])):
        case["plain_logits"] = logits
    return out


@pytest.mark.parametrize("name", ["mamba-24", "mamba2", *[n for n in TINY if n != "mamba2"]])
def test_plain_transformers_load_gives_steer_logits_bit_for_bit(exported, name):
    case = exported[name]
    logits = case["plain_logits"]
    source = AutoModelForCausalLM.from_pretrained(case["source"]).eval()
    reference = steered_logits(source, case["steerings"])
    assert logits.dtype == torch.float32 and torch.equal(logits, reference)
    with torch.no_grad():
        assert not torch.equal(logits, source(input_ids=IDS, use_cache=False).logits)  # the steering shows


@pytest.mark.parametrize("name", ["mamba-24", "mamba2", "zamba", "jamba"])
def test_unsteered_tensors_are_byte_identical_and_undo_is_exact(exported, name):
    case = exported[name]
    source, steered = load_file(case["source"] / "model.safetensors"), load_file(case["out"] / "model.safetensors")
    record = json.loads((case["out"] / "steering.json").read_text())
    assert source.keys() == steered.keys() and set(record["undo"]) < source.keys()
    for key in source.keys() - record["undo"].keys():
        assert steered[key].dtype == source[key].dtype
        assert torch.equal(steered[key].view(torch.uint8), source[key].view(torch.uint8)), key
    for key, undo in record["undo"].items():
        restored = steered[key].clone()
        rows = restored.view(-1, restored.shape[-1]) if restored.dim() > 1 else restored.view(-1, 1)
        assert undo["rows"]  # something was edited
        rows[undo["rows"]] = torch.tensor(undo["original"], dtype=rows.dtype)
        assert torch.equal(restored.view(torch.uint8), source[key].view(torch.uint8)), key
    assert record["source"]["model"] == str(case["source"]) and record["source"]["fingerprint"] == record["provenance"]["model_digest"]
    assert [Steering.from_json(s, "steering.json") for s in record["steering"]] == case["steerings"]
    assert record["provenance"]["family"] == record["source"]["family"]


def test_a_source_offloaded_to_disk_exports_the_same_checkpoint(exported, tmp_path):
    case = exported["mamba-24"]
    args, _ = steering_args(AutoModelForCausalLM.from_pretrained(case["source"]))
    assert export(case["source"], tmp_path / "out", *args, "--device", "auto", "--max_memory", "cpu=40KB",
                  "--offload_folder", tmp_path / "offload") == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (case["out"] / name).read_bytes(), name
    offloaded, in_memory = (json.loads((d / "steering.json").read_text()) for d in (tmp_path / "out", case["out"]))
    assert offloaded == in_memory


def test_half_precision_source_exports_in_its_dtype(tokenizer, tmp_path):
    model = make_tiny("mamba2")
    source = save_source(model, tokenizer, tmp_path / "bf16", torch.bfloat16)
    args, steerings = steering_args(model)
    assert export(source, tmp_path / "out", *args) == 0
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS, use_cache=False).logits, steered_logits(source_model, steerings))


def test_a_site_shared_with_another_layer_is_refused(tokenizer):
    model = make_model(tokenizer)
    model.backbone.layers[3].mixer.dt_proj.weight = model.backbone.layers[2].mixer.dt_proj.weight
    with pytest.raises(UsageError, match="shares its memory with backbone.layers.3.mixer.dt_proj.weight"):
        edited_parameters(model, [2])
    assert set(edited_parameters(model, [4])) == {"backbone.layers.4.mixer.dt_proj.weight",
                                                  "backbone.layers.4.mixer.dt_proj.bias"}


def test_mean_ablation_sets_the_neurons_to_their_mean(exported, tmp_path):
    case = exported["mamba-24"]
    pile = tmp_path / "pile.txt"
    pile.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    out = tmp_path / "mean"
    assert export(case["source"], out, "--steer", "20:4,9:0", "--ablation", "mean", "--pile_path", pile) == 0
    record = json.loads((out / "steering.json").read_text())
    (steering,) = record["steering"]
    assert "values" in steering and steering["neurons"] == [4, 9]
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["backbone.layers.20.mixer.dt_proj.weight"][[4, 9]], torch.zeros(2, 4))
    assert weights["backbone.layers.20.mixer.dt_proj.bias"][[4, 9]].tolist() == pytest.approx(steering["values"])
    assert record["mean_ablation"]["documents"]


def test_from_step2_exports_the_high_impact_group_by_its_factor(exported, tmp_path):
    case = exported["mamba-24"]
    step1 = step1_file(tmp_path / "step1.json", {1: 3.0, 2: 2.5, 3: 0.0}, 21, case["source"], 32)
    step2 = step2_file(tmp_path / "step2.json", step1, [1, 2], {"high_impact": {
        "factor": 4.0, "beats_baseline": True, "selection_best_factor": 4.0, "confirmed": True}})
    assert export(case["source"], tmp_path / "out", "--from_step2", step2) == 0
    record = json.loads((tmp_path / "out" / "steering.json").read_text())
    assert record["steering"] == [{"layer": 21, "neurons": [1, 2], "factor": 4.0}]
    assert record["factor_source"] == "step2-confirmed" and record["provenance"]["layer"] == 21
    assert record["provenance"]["inputs"]["step2_file"]["sha256"] == file_digest(step2)
    source, steered = load_file(case["source"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    key = "backbone.layers.21.mixer.dt_proj.bias"
    assert torch.equal(steered[key][[1, 2]], source[key][[1, 2]] * 4.0) and torch.equal(steered[key][0], source[key][0])


@pytest.mark.parametrize("extra, message", [
    ([], "give --steer LAYER:NEURONS:FACTOR (one or more) or --from_step2 FILE"),
    (["--steer", "20:1:2", "--steer", "99:1:2"], "--steer layer 99 out of range"),
    (["--steer", "20:1:-2"], "must be >= 0"),
    (["--steer", "20:1:2", "--ablation", "mean"], "--ablation mean applies to neurons steered by factor 0"),
])
def test_bad_inputs_exit_2_with_one_line(exported, tmp_path, capsys, extra, message):
    assert export(exported["mamba-24"]["source"], tmp_path / "out", *extra) == 2
    assert message in one_line(capsys)


def test_an_existing_output_folder_is_refused(exported, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert export(exported["mamba-24"]["source"], tmp_path / "out", "--steer", "20:1:2") == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_a_step2_file_of_another_model_is_refused_without_naming_an_option_it_lacks(exported, tmp_path, capsys):
    case = exported["mamba-24"]
    step1 = step1_file(tmp_path / "step1.json", {1: 3.0, 2: 2.5}, 21, exported["mamba2"]["source"], 32)
    step2 = step2_file(tmp_path / "step2.json", step1, [1, 2], {"high_impact": {
        "factor": 4.0, "beats_baseline": True, "selection_best_factor": 4.0, "confirmed": True}})
    assert export(case["source"], tmp_path / "out", "--from_step2", step2) == 2
    line = one_line(capsys)
    assert "field model_digest" in line and "--steer" in line and "--allow_model_mismatch" not in line
    assert not (tmp_path / "out").exists()


def test_a_factor_driving_the_outputs_to_non_finite_values_is_one_line_and_leaves_no_folder(exported, tmp_path,
                                                                                          capsys):
    assert export(exported["mamba-24"]["source"], tmp_path / "out", "--steer", "20:1:1e300") == 2
    assert "drives the model's outputs to non-finite values" in one_line(capsys)
    assert not (tmp_path / "out").exists()
