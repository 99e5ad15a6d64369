"""The loader: local HF checkpoints, original state-spaces checkpoints, and each bad input."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from delta_steering.cli import UsageError
from conftest import ROOT
from mamba_model_loader import describe, load_mamba_model
from scripts import run_main


def test_round_trip_of_a_saved_tiny_model(tiny_model_dir, tiny_model, tokenizer):
    model, tok = load_mamba_model(str(tiny_model_dir), device="cpu")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert not model.training and tok("The quick brown fox").input_ids == ids[0].tolist()
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, atol=1e-5, rtol=1e-5)
    info = describe(model)
    assert (info["layers"], info["delta_neurons_per_layer"], info["device"], info["dtype"]) == (24, 32, "cpu", "float32")
    assert info["parameters"] == sum(p.numel() for p in tiny_model.parameters())


@pytest.mark.parametrize("installed,cuda,expected", [
    ({"mamba_ssm", "causal_conv1d", "mambapy"}, True, "fused CUDA kernels (mamba_ssm + causal_conv1d)"),
    ({"mamba_ssm", "causal_conv1d", "mambapy"}, False, "torch reference scan (mambapy parallel scan available"),
    ({"mamba_ssm", "mambapy"}, True, "torch reference scan (mambapy parallel scan available"),
    (set(), True, "torch reference scan (sequential)"),
])
def test_ssm_backend_names_the_scan_that_runs(monkeypatch, installed, cuda, expected):
    import importlib.util

    from delta_steering.model import loading as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert models.ssm_backend().startswith(expected)


def test_dtype_and_cuda_fallback(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the fallback, on any machine
    model, _ = load_mamba_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    assert capsys.readouterr().err.strip().splitlines() == ["warning: CUDA is not available, running on CPU (slow)"]
    with pytest.raises(UsageError, match="unknown dtype"):
        load_mamba_model(str(tiny_model_dir), device="cpu", dtype="float8")


def copy_dir(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_missing_directory_and_missing_files(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="local model directory not found: ./nowhere/model"):
        load_mamba_model("./nowhere/model", device="cpu")
    no_tok = copy_dir(tiny_model_dir, tmp_path / "no_tok", ["tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(UsageError, match=r"is missing: tokenizer"):
        load_mamba_model(str(no_tok), device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UsageError, match=r"is missing: weights .*, tokenizer"):
        load_mamba_model(str(bare), device="cpu")


@pytest.mark.parametrize("model_type,message", [("gpt2", "not a selective-SSM model this tool knows (model_type 'gpt2')"),
                                                ("llama", "model_type 'llama'); supported: mamba, falcon_mamba")])
def test_other_architectures_are_refused(tiny_model_dir, tmp_path, model_type, message):
    other = copy_dir(tiny_model_dir, tmp_path / model_type)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(UsageError, match=re.escape(message)):
        load_mamba_model(str(other), device="cpu")


def save_original(model, original):
    """Write a Mamba model the way mamba_ssm saves it."""
    original.mkdir()
    config = model.config
    (original / "config.json").write_text(json.dumps({
        "d_model": config.hidden_size, "n_layer": config.num_hidden_layers, "vocab_size": config.vocab_size,
        "ssm_cfg": {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
                    "dt_rank": config.time_step_rank},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    torch.save(state, original / "pytorch_model.bin")
    return original


def test_original_format_checkpoint_is_converted(tiny_model, tiny_model_dir, tokenizer, tmp_path):
    """Write the tiny model the way mamba_ssm saves it; the loader must give the same logits."""
    original = save_original(tiny_model, tmp_path / "original")
    model, tok = load_mamba_model(str(original), device="cpu", tokenizer=str(tiny_model_dir))
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert describe(model)["original_format"] is True


def test_cli_prints_the_summary_and_exits_2_on_bad_input(tiny_model_dir):
    ok = subprocess.run([sys.executable, "mamba_model_loader.py", str(tiny_model_dir), "--device", "cpu"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "delta_neurons_per_layer: 32" in ok.stdout
    bad = subprocess.run([sys.executable, "mamba_model_loader.py", "./missing", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: local model directory not found: ./missing"]


@pytest.mark.parametrize("name", ["falcon_mamba", "jamba", "zamba", "mamba2", "bamba", "zamba2", "nemotron_h",
                                  "granitemoehybrid", "falcon_h1"])
def test_every_family_loads_from_a_local_directory(name, tokenizer, tmp_path, capsys):
    from families import TINY, make_tiny

    model = make_tiny(name, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_mamba_model(str(tmp_path), device="cpu")
    assert type(loaded).__name__ == TINY[name][1]
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    info = describe(loaded)
    assert info["family"] == name and info["delta_neurons_per_layer"] == (4 if TINY[name][2] == "mamba2" else 32)
    capsys.readouterr()
    assert run_main("mamba_model_loader", [tmp_path, "--device", "cpu"]) == 0  # the script, in-process
    printed = capsys.readouterr().out
    assert f"family: {name}" in printed and "ssm_layers:" in printed


def test_original_mamba2_checkpoint_is_converted(tokenizer, tmp_path):
    """A Mamba-2 model saved the way mamba_ssm saves it (d_model / n_layer / ssm_cfg, embedding named
    backbone.embedding): the loader gives the same logits."""
    from families import make_tiny

    model = make_tiny("mamba2", vocab_size=len(tokenizer), tie_word_embeddings=True)
    config = model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": config.hidden_size, "d_intermediate": 0, "n_layer": config.num_hidden_layers,
        "vocab_size": config.vocab_size, "pad_vocab_size_multiple": 1, "rms_norm": True, "residual_in_fp32": True,
        "tie_embeddings": True, "ssm_cfg": {"layer": "Mamba2", "d_state": config.state_size,
                                            "d_conv": config.conv_kernel, "expand": config.expand,
                                            "headdim": config.head_dim, "ngroups": config.n_groups,
                                            "chunk_size": config.chunk_size}}))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded, _ = load_mamba_model(str(tmp_path), device="cpu", tokenizer=str(ROOT / "models" / "mamba-tiny-demo"))
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert describe(loaded)["family"] == "mamba2" and describe(loaded)["original_format"] is True
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "attn_layer_idx": [1]}))
    with pytest.raises(UsageError, match="Mamba2ForCausalLM cannot hold"):
        load_mamba_model(str(tmp_path), device="cpu")


def test_device_auto_spreads_the_model_over_cpu_and_disk(tiny_model_dir, tmp_path, capsys):
    model, _ = load_mamba_model(str(tiny_model_dir), "auto", max_memory="cpu=100KB",
                                offload_folder=str(tmp_path / "offload"))
    where = "cpu: backbone.embeddings, lm_head, backbone.layers.0-5; disk: backbone.norm_f, backbone.layers.6-23"
    assert capsys.readouterr().out == f"device map: {where}\n"
    assert describe(model)["device"] == f"auto ({where})" and describe(model)["dtype"] == "float32"
    assert model.backbone.layers[5].mixer.dt_proj.weight.device.type == "cpu"
    assert model.backbone.layers[6].mixer.dt_proj.weight.device.type == "meta"  # read from disk at each forward
    in_memory, _ = load_mamba_model(str(tiny_model_dir), "cpu")
    ids = torch.tensor([[5, 17, 3, 42, 8, 99]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, in_memory(ids).logits)


def test_an_original_checkpoint_spread_over_cpu_and_disk_writes_its_offloaded_layers_to_the_folder(
        tiny_model, tiny_model_dir, tmp_path):
    """Safetensors checkpoints are read in place; an original one has no such file to read from."""
    original = save_original(tiny_model, tmp_path / "original")
    folder = tmp_path / "offload"
    model, _ = load_mamba_model(str(original), "auto", tokenizer=str(tiny_model_dir), max_memory="cpu=40KB",
                                offload_folder=str(folder))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert (folder / "backbone.layers.20.mixer.dt_proj.weight.dat").is_file()
    ids = torch.tensor([[5, 17, 3, 42, 8, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_memory_check_refuses_before_reading_a_weight(tiny_model_dir, tmp_path, monkeypatch):
    from delta_steering.model import loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(UsageError, match=r"\(251.6 KiB in float32\) does not fit the memory it may use \(cpu 39.1 "
                                         r"KiB allowed of .* free\): accelerate's device map leaves 226.6 KiB of it "
                                         r"\(backbone.norm_f, backbone.layers\) for disk; add --offload_folder DIR"):
        load_mamba_model(str(tiny_model_dir), "auto", max_memory="cpu=40KB")
    with pytest.raises(UsageError, match="leaves no room for its input embeddings"):
        load_mamba_model(str(tiny_model_dir), "auto", max_memory="cpu=1KB", offload_folder=str(tmp_path))
    monkeypatch.setattr(loading, "free_bytes", lambda device: 200_000)  # 195.3 KiB free: bfloat16 would fit
    with pytest.raises(UsageError, match=r"needs 251.6 KiB in float32 but cpu has 195.3 KiB free: use --device auto "
                                         r"--offload_folder DIR .*, or --dtype bfloat16 \(125.8 KiB\)$"):
        load_mamba_model(str(tiny_model_dir), "cpu")
    with pytest.raises(UsageError, match="with --device cpu it is loaded whole there"):
        load_mamba_model(str(tiny_model_dir), "cpu", offload_folder=str(tmp_path))
