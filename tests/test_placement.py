"""Models spread by accelerate over the CPU and disk: steering reaches offloaded layers (every family,
against the model in memory; the 24-layer tiny Mamba against rows scaled by hand) and restores the
stored bits, and every engine gives the numbers of the same model in memory, bit for bit."""

import copy
import json

import numpy as np
import pytest
import torch
from accelerate import cpu_offload, disk_offload
from safetensors.torch import load_file

from delta_steering.engine.attribution import layer_attributions
from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.engine.generation import generate_greedy
from delta_steering.engine.perplexity import document_losses
from delta_steering.engine.scoring import encode_examples, loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.model import placement
from delta_steering.model.delta_stats import layer_delta_statistics
from delta_steering.model.loading import load_model
from delta_steering.model.sites import ssm_layers
from delta_steering.model.steering import steer
from delta_steering.data.tasks import load_examples
from families import TINY, make_tiny
from tiny import scaled_rows

IDS = torch.tensor([[5, 17, 3, 42, 8, 99, 23, 61, 7, 12, 30, 2]])
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, they say.",
         "Write a poem about the sea."]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def in_memory(tiny_model_dir):
    return load_model(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="module")
def offloaded(tiny_model_dir, tmp_path_factory):
    """The 24-layer tiny model with 100 KB of CPU memory: embeddings, head and blocks 0-5 in memory,
    blocks 6-23 read from disk at each forward."""
    model, tokenizer = load_model(str(tiny_model_dir), "auto", max_memory="cpu=100KB",
                                  offload_folder=str(tmp_path_factory.mktemp("offload")))
    return model, tokenizer


def test_the_blocks_are_split_between_cpu_and_disk_and_compute_as_in_memory(offloaded, in_memory, tiny_model_dir):
    model = offloaded[0]
    assert model.hf_device_map["backbone.layers.5"] == "cpu" and model.hf_device_map["backbone.layers.6"] == "disk"
    assert model.backbone.layers[5].mixer.dt_proj.weight.device.type == "cpu"
    mixer = model.backbone.layers[20].mixer
    assert mixer.dt_proj.weight.device.type == "meta" and placement.offloaded(mixer.dt_proj, "weight")
    stored = load_file(tiny_model_dir / "model.safetensors")["backbone.layers.20.mixer.dt_proj.weight"]
    assert torch.equal(placement.weight(mixer.dt_proj, "weight"), stored)  # read from where it is stored
    assert placement.input_device(model) == placement.execution_device(mixer) == torch.device("cpu")
    assert torch.equal(logits(model), logits(in_memory[0]))


def test_an_edit_of_the_offloaded_parameter_itself_does_nothing(offloaded):
    """Why steering must edit what the hook reads: the module's parameter is an empty meta tensor."""
    model = offloaded[0]
    before = logits(model)
    with torch.no_grad():
        model.backbone.layers[20].mixer.dt_proj.weight.mul_(5.0)
    assert torch.equal(logits(model), before)


def test_steering_an_offloaded_layer_equals_rows_scaled_by_hand_and_restores_the_stored_bits(offloaded, in_memory):
    model = offloaded[0]
    mixer = model.backbone.layers[20].mixer
    stored_map = mixer.dt_proj._hf_hook.weights_map
    before = logits(model)
    reference = scaled_rows(in_memory[0], 20, [1, 5, 30], 5.0)
    with steer(model, 20, [1, 5, 30], 5.0):
        assert torch.equal(logits(model), logits(reference))
        with steer(model, 20, [2], 0.0):  # composes, as in memory
            both = logits(model)
    assert not torch.equal(both, before)
    assert torch.equal(logits(model), before)
    assert mixer.dt_proj._hf_hook.weights_map is stored_map  # reading from disk again, nothing kept in memory
    assert mixer.dt_proj.weight.device.type == "meta"


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("offload", [disk_offload, cpu_offload], ids=["disk", "cpu"])
def test_every_family_steers_offloaded_as_in_memory(name, offload, tmp_path):
    reference = make_tiny(name)
    model = copy.deepcopy(reference)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    if offload is disk_offload:
        disk_offload(model, str(tmp_path), execution_device=torch.device("cpu"))
    else:
        cpu_offload(model, execution_device=torch.device("cpu"), state_dict=stored)
    layer = ssm_layers(reference)[-1]
    before = logits(model)
    with steer(model, layer, [0, 1], 3.0), steer(reference, layer, [0, 1], 3.0):
        assert torch.equal(logits(model), logits(reference)) and not torch.equal(logits(model), before)
    assert torch.equal(logits(model), before)
    if offload is cpu_offload:  # the CPU copy the hook reads was never edited
        assert all(torch.equal(stored[k], v) for k, v in reference.state_dict().items())


@pytest.fixture(scope="module")
def requests(in_memory, tmp_path_factory):
    """Multiple-choice examples whose three choices share their context."""
    task = tmp_path_factory.mktemp("task") / "task.jsonl"
    rows = [{"context": c, "choices": [" Paris", " the sea", " a roof"], "label": i % 3}
            for i, c in enumerate(["The capital of France is", "He sat on", "Write a poem about"])]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples([str(task)], None, "discovery", 3)
    return examples, encode_examples(in_memory[1], examples)


@pytest.mark.parametrize("share", [True, False])
def test_scoring_and_the_fast_engine_offloaded_equal_in_memory(offloaded, in_memory, requests, share):
    encoded = requests[1]
    ablation = Intervention.scale([0, 7, 31], 0.0)
    for run in (lambda m, t: loglikelihoods(m, t, encoded, share_contexts=share),
                lambda m, t: fast_loglikelihoods(m, t, encoded, 22, ablation, batch_size=4, share_contexts=share)):
        (lp_off, greedy_off), (lp_mem, greedy_mem) = run(*offloaded), run(*in_memory)
        assert np.array_equal(lp_off, lp_mem) and np.array_equal(greedy_off, greedy_mem)


def test_attribution_offloaded_equals_in_memory(offloaded, in_memory, requests):
    examples, encoded = requests
    ablations = {layer: Intervention.scale(range(32), 0.0) for layer in (3, 20)}  # in memory, on disk
    off, mem = (layer_attributions(*pair, examples, encoded, ablations, batch_size=4) for pair in (offloaded, in_memory))
    for layer in ablations:
        assert np.array_equal(off[layer].delta, mem[layer].delta) and np.array_equal(off[layer].base, mem[layer].base)


def test_perplexity_delta_statistics_and_generation_offloaded_equal_in_memory(offloaded, in_memory):
    assert document_losses(*offloaded, TEXTS) == document_losses(*in_memory, TEXTS)
    off, mem = (layer_delta_statistics(*pair, TEXTS, [3, 20]) for pair in (offloaded, in_memory))
    assert all(torch.equal(off[layer][key], mem[layer][key]) for layer in (3, 20) for key in ("dt_pre_mean",
                                                                                             "delta_variance"))
    with steer(offloaded[0], 20, [1, 5], 5.0), steer(in_memory[0], 20, [1, 5], 5.0):
        assert generate_greedy(*offloaded, TEXTS[:2], 4) == generate_greedy(*in_memory, TEXTS[:2], 4)
