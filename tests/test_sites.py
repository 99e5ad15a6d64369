"""Every selective-SSM family: its SSM layers and delta neurons, and steering through the weights
against an independent reference (dt_pre rewritten at the mixer's scan entry), on the whole sequence
and in cached generation; bit-exact restore; dt_pre capture; the output head."""

import pytest
import torch

from delta_steering.model import steering
from delta_steering.errors import UsageError
from delta_steering.model.sites import OutputHead, capture_dt_pre, check_layer, family_of, shape_of
from families import TINY, make_tiny, patch_dt_pre, ssm_mixers, tiny_config

FAMILIES = list(TINY)
EXPECTED = {  # SSM layers, delta neurons per layer
    "mamba": ((0, 1), 32), "falcon_mamba": ((0, 1), 32), "jamba": ((0,), 32), "zamba": ((0, 1, 2, 3), 32),
    "mamba2": ((0, 1), 4), "bamba": ((0, 2), 4), "zamba2": ((0, 1, 2), 4), "nemotron_h": ((0,), 4),
    "granitemoehybrid": ((0,), 4), "falcon_h1": ((0, 1), 4),
}
_models = {}


def model_of(name):
    if name not in _models:
        _models[name] = make_tiny(name)
    return _models[name]


def tokens(batch=2, length=11):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(1))


def target(model):
    layers = sorted(ssm_mixers(model))
    n = shape_of(model).delta_neurons
    return layers[-1], [0, n // 2, n - 1]


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_layers_and_neurons_from_the_model_and_from_the_config_alone(name):
    model = model_of(name)
    layers, neurons = EXPECTED[name]
    assert tuple(sorted(ssm_mixers(model))) == layers
    for shape in (shape_of(model), shape_of(tiny_config(name))):
        assert (shape.ssm_layers, shape.delta_neurons) == (layers, neurons)
    assert family_of(model).name == name
    for other in set(range(shape_of(model).num_layers)) - set(layers):
        with pytest.raises(UsageError, match=f"--layer {other} is not an SSM layer .*SSM layers are"):
            check_layer(model, other, "--layer")


@pytest.mark.parametrize("name", FAMILIES)
def test_steering_equals_the_reference_and_restores_bit_for_bit(name):
    model = model_of(name)
    layer, neurons = target(model)
    ids = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, ids)
    for factor in (0.0, 0.5, 3.0):
        with patch_dt_pre(model, name, layer, neurons, factor=factor):
            expected = logits(model, ids)
        assert (expected - base).abs().max() > 1e-2  # the reference changes the model
        with steering.steer(model, layer, neurons, factor):
            assert list(model.state_dict()) == list(before)  # no parametrization, no renamed keys
            steered = logits(model, ids)
        torch.testing.assert_close(steered, expected, atol=2e-5, rtol=1e-5)
    for value in (-2.0, 0.7):
        with patch_dt_pre(model, name, layer, neurons, value=value):
            expected = logits(model, ids)
        with steering.steer(model, layer, neurons, mode="mean", means=[value] * len(neurons)):
            steered = logits(model, ids)
        torch.testing.assert_close(steered, expected, atol=2e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_sees_the_steering(name):
    model = model_of(name)
    layer, neurons = target(model)
    prompt = tokens(batch=1, length=6)

    def generate():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits)

    plain_tokens, plain = generate()
    with patch_dt_pre(model, name, layer, neurons, factor=3.0):
        expected_tokens, expected = generate()
    with steering.steer(model, layer, neurons, 3.0):
        steered_tokens, steered = generate()
    assert torch.equal(steered_tokens, expected_tokens)
    torch.testing.assert_close(steered, expected, atol=2e-5, rtol=1e-5)
    assert (steered - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_records_dt_pre_with_steering_included(name):
    model = model_of(name)
    layer, neurons = target(model)
    ids = tokens()
    with capture_dt_pre(model, layer) as plain, torch.no_grad():
        model(ids, use_cache=False)
    with capture_dt_pre(model, layer) as scaled, steering.steer(model, layer, neurons, 3.0), torch.no_grad():
        model(ids, use_cache=False)
    assert plain[0].shape == (2, 11, shape_of(model).delta_neurons)
    torch.testing.assert_close(scaled[0][..., neurons], 3 * plain[0][..., neurons], atol=1e-5, rtol=1e-5)
    others = [i for i in range(plain[0].shape[-1]) if i not in neurons]
    torch.testing.assert_close(scaled[0][..., others], plain[0][..., others])
    seen = []
    with patch_dt_pre(model, name, layer, [], factor=1.0, seen=seen), torch.no_grad():
        model(ids, use_cache=False)  # dt_pre where the scan is entered
    torch.testing.assert_close(plain[0], torch.cat(seen, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_output_head_gives_the_models_logits(name):
    model = model_of(name)
    ids = tokens()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(OutputHead(model)(hidden).float(), logits(model, ids).float(), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory, tokenizer):
    """A tiny Bamba saved with a tokenizer: layer 0 SSM, layer 1 attention, layer 2 SSM."""
    directory = tmp_path_factory.mktemp("bamba")
    make_tiny("bamba", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.usefixtures("punkt")
def test_three_steps_on_a_hybrid(hybrid_dir, tmp_path, capsys):
    import json

    from scripts import run_main
    from test_step3 import PROMPTS

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Key {i} is", "choices": [" red", " blue", " green"],
                                        "label": i % 3}) + "\n" for i in range(16)))
    pile = tmp_path / "pile.txt"
    pile.write_text("\n\n".join(f"Document {i}: the quick brown fox and the sea." for i in range(6)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"key": k, "prompt": p, "instruction_id_list": i, "kwargs": kw}) + "\n"
                               for k, p, i, kw in PROMPTS[:2]))
    common = ["--model", hybrid_dir, "--device", "cpu", "--pile_path", pile, "--no_plots"]
    step1 = [*common, "--tasks", task, "--save_path", tmp_path / "d.json", "--output_dir", tmp_path / "s1"]
    assert run_main("step1_neuron_discovery", [*step1, "--layer", "1"]) == 2
    assert "--layer 1 is not an SSM layer (full_attention); the SSM layers are 0, 2" in capsys.readouterr().err
    assert run_main("step1_neuron_discovery", [*step1, "--layer", "2", "--threshold", "-100"]) == 0
    assert "runs the naive engine" in capsys.readouterr().out
    discovery = json.loads((tmp_path / "d.json").read_text())
    assert discovery["layer"] == 2 and len(discovery["all_neuron_impacts"]) == 4 and discovery["engine"] == "naive"
    assert run_main("step2_steering_factor_determination", [*common, "--neurons_file", tmp_path / "d.json",
                                                            "--factors", "0.5,3", "--num_examples", "4",
                                                            "--output_dir", tmp_path / "s2"]) == 0
    assert run_main("step3_steer_performance_verification", [
        *common, "--neurons_file", tmp_path / "d.json", "--factor", "3", "--both", "--ifeval_path", prompts,
        "--num_samples", "2", "--max_new_tokens", "4", "--output_dir", tmp_path / "s3"]) == 0
    layers = json.loads((tmp_path / "s3" / "layer_ablation_ifeval_results.json").read_text())
    assert [c["layer"] for c in layers["configurations"][1:]] == [0, 2]  # the SSM layers around layer 2
