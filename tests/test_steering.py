"""`steer` against an explicit reference: a Mamba forward that calls `dt_proj` as a module, so a real
forward hook on it scales the output channels, which is what steering means."""

import pytest
import torch
import torch.nn.functional as F

from delta_steering import (Intervention, Steering, SteeringError, UsageError, apply, delta_statistics, steer,
                            verify_steering_effect)
from delta_steering.model.sites import capture_dt_pre


def reference_mixer(mixer, hidden):
    """Mamba-1 mixer written out step by step; `dt_proj` is called as a module (hooks fire)."""
    T = hidden.shape[1]
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    x = F.conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, padding=mixer.conv_kernel_size - 1,
                 groups=mixer.intermediate_size)[..., :T]
    x = F.silu(x).transpose(1, 2)
    time_step, B, C = torch.split(mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size,
                                                     mixer.ssm_state_size], dim=-1)
    dt = F.softplus(mixer.dt_proj(time_step))
    A = -torch.exp(mixer.A_log.float())
    state = torch.zeros(x.shape[0], x.shape[2], mixer.ssm_state_size)
    ys = []
    for t in range(T):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((state * C[:, t, None, :]).sum(-1))
    y = (torch.stack(ys, 1) + x * mixer.D) * F.silu(z.transpose(1, 2))
    return mixer.out_proj(y)


@torch.no_grad()
def reference_logits(model, input_ids):
    hidden = model.backbone.embeddings(input_ids)
    for block in model.backbone.layers:
        hidden = hidden + reference_mixer(block.mixer, block.norm(hidden))
    return model.lm_head(model.backbone.norm_f(hidden))


def channel_hook(neurons, factor):
    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., neurons] *= factor
        return output
    return hook


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    return tokenizer(["The quick brown fox asked: what is the capital of France?"], return_tensors="pt").input_ids


def test_reference_matches_transformers(tiny_model, probe_ids):
    expected = tiny_model(probe_ids).logits
    torch.testing.assert_close(reference_logits(tiny_model, probe_ids), expected, atol=1e-5, rtol=1e-5)


def test_forward_hook_on_dt_proj_never_fires_in_transformers(tiny_model, probe_ids):
    calls = []
    handle = tiny_model.backbone.layers[3].mixer.dt_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_model(probe_ids)
    finally:
        handle.remove()
    assert calls == []  # the pitfall that decides the design: why steering goes through the weights


@pytest.mark.parametrize("layer", [0, 11, 20, 23])
@pytest.mark.parametrize("factor", [0.0, 0.5, 3.0, 100.0])
def test_steer_equals_hooked_reference_whole_sequence(tiny_model, probe_ids, layer, factor):
    neurons = [0, 5, 17, 31]
    plain = reference_logits(tiny_model, probe_ids)
    hook = tiny_model.backbone.layers[layer].mixer.dt_proj.register_forward_hook(channel_hook(neurons, factor))
    try:
        expected = reference_logits(tiny_model, probe_ids)
    finally:
        hook.remove()
    assert (expected - plain).abs().max() > 1e-4  # the reference intervention does something
    with steer(tiny_model, layer, neurons, factor):
        steered = tiny_model(probe_ids, use_cache=False).logits
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer,factor", [(2, 0.0), (20, 3.0), (23, 100.0)])
def test_steer_equals_hooked_reference_cached_token_by_token(tiny_model, probe_ids, layer, factor):
    neurons = [1, 2, 30]
    hook = tiny_model.backbone.layers[layer].mixer.dt_proj.register_forward_hook(channel_hook(neurons, factor))
    try:
        expected = reference_logits(tiny_model, probe_ids)
    finally:
        hook.remove()
    with steer(tiny_model, layer, neurons, factor), torch.no_grad():
        out = tiny_model(probe_ids[:, :3], use_cache=True)
        step_logits = [out.logits]
        cache = out.cache
        for t in range(3, probe_ids.shape[1]):
            out = tiny_model(probe_ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits)
    # token-by-token and whole-sequence fp32 arithmetic differ by ~1e-5 in transformers itself
    torch.testing.assert_close(torch.cat(step_logits, 1), expected, atol=1e-5, rtol=1e-4)


def test_per_neuron_factors_and_composition(tiny_model, probe_ids):
    layer = 7
    hook = tiny_model.backbone.layers[layer].mixer.dt_proj.register_forward_hook(
        lambda m, i, o: o * torch.tensor([2.0 if n in (3, 4) else 0.5 if n == 9 else 1.0 for n in range(o.shape[-1])]))
    try:
        expected = reference_logits(tiny_model, probe_ids)
    finally:
        hook.remove()
    with steer(tiny_model, layer, [3, 9], [2.0, 0.5]), steer(tiny_model, layer, [4], 2.0):
        torch.testing.assert_close(tiny_model(probe_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_weights_and_state_dict_restored_bit_identical(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    first = steer(tiny_model, 5, [0, 1, 2], 7.0)
    second = steer(tiny_model, 5, [2, 3], 0.3)
    third = steer(tiny_model, 6, [4], mode="mean", means=[0.25])
    assert list(tiny_model.state_dict()) == list(before)
    assert not torch.equal(tiny_model.backbone.layers[5].mixer.dt_proj.weight, before["backbone.layers.5.mixer.dt_proj.weight"])
    first.remove()  # removal out of install order
    torch.testing.assert_close(tiny_model.backbone.layers[5].mixer.dt_proj.weight[[0, 1]],
                               before["backbone.layers.5.mixer.dt_proj.weight"][[0, 1]], atol=0, rtol=0)
    third.remove()
    second.remove()
    second.remove()  # idempotent
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_weights_restored_after_exception(tiny_model):
    weight = tiny_model.backbone.layers[1].mixer.dt_proj.weight.clone()
    bias = tiny_model.backbone.layers[1].mixer.dt_proj.bias.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, 1, [0, 3], 0.0):
            raise RuntimeError("boom")
    assert torch.equal(tiny_model.backbone.layers[1].mixer.dt_proj.weight, weight)
    assert torch.equal(tiny_model.backbone.layers[1].mixer.dt_proj.bias, bias)


def test_mean_mode_sets_channel_to_constant(tiny_model, probe_ids):
    with capture_dt_pre(tiny_model, 4) as captured, steer(tiny_model, 4, [2, 6], mode="mean", means=[0.5, -1.5]):
        tiny_model(probe_ids)
    assert torch.allclose(captured[0][..., 2], torch.tensor(0.5))
    assert torch.allclose(captured[0][..., 6], torch.tensor(-1.5))


def test_out_of_range_inputs(tiny_model):
    with pytest.raises(ValueError, match="0-23"):
        steer(tiny_model, 24, [0], 2.0)
    with pytest.raises(ValueError, match="0-31"):
        steer(tiny_model, 0, [32], 2.0)
    with pytest.raises(ValueError, match="0-31"):
        steer(tiny_model, 0, [-1], 2.0)
    with pytest.raises(ValueError, match="mode"):
        steer(tiny_model, 0, [1], 2.0, mode="double")


def test_probe_accepts_real_steering_and_catches_a_no_op(tiny_model):
    assert verify_steering_effect(tiny_model, Steering(20, Intervention.scale([0, 1, 2], 0.0))) > 0
    assert verify_steering_effect(tiny_model, [Steering(3, Intervention.scale([1], 5.0)),
                                               Steering(20, Intervention.set([4], [0.5]))]) > 0
    with pytest.raises(SteeringError, match="did not change"):  # factor 1 edits nothing
        verify_steering_effect(tiny_model, Steering(20, Intervention.scale([0, 1, 2], 1.0)))


def test_a_factor_that_makes_the_outputs_non_finite_is_a_usage_error_naming_the_factor(tiny_model):
    with pytest.raises(UsageError, match="the factor drives the model's outputs to non-finite values"):
        verify_steering_effect(tiny_model, Steering(20, Intervention.scale([0, 1], 1e300)))
    assert verify_steering_effect(tiny_model, Steering(20, Intervention.scale([0, 1], 5.0))) > 0  # restored


def test_a_model_with_non_finite_weights_is_refused_before_any_steering(tokenizer):
    from delta_steering.model.steering import check_finite_outputs
    from tiny import make_model

    model = make_model(tokenizer, num_hidden_layers=4)
    check_finite_outputs(model)
    with torch.no_grad():
        model.backbone.layers[2].mixer.D[3] = float("nan")
    for check in (check_finite_outputs, lambda m: verify_steering_effect(m, Steering(3, Intervention.scale([0], 2.0)))):
        with pytest.raises(UsageError, match="the baseline's outputs are not finite.*backbone.layers.2.mixer.D holds NaN"):
            check(model)


def test_apply_installs_several_steerings_and_removes_them_all(tiny_model, probe_ids):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with steer(tiny_model, 2, [1], 3.0), steer(tiny_model, 9, [0, 5], 0.5):
        expected = tiny_model(probe_ids).logits
    with apply(tiny_model, [Steering(2, Intervention.scale([1], 3.0)), Steering(9, Intervention.scale([0, 5], 0.5))]):
        assert torch.equal(tiny_model(probe_ids).logits, expected)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("record", [
    {"layer": 20, "neurons": [1, 2], "factor": 5.0},
    {"layer": 3, "neurons": [4, 0], "factors": [0.5, 2.0]},
    {"layer": 7, "neurons": [1], "values": [-0.25]},
    {"layer": 7, "neurons": [1, 3], "factor": 0.0},
])
def test_steering_json_round_trip(record):
    steering = Steering.from_json(record, "test")
    assert steering.to_json() == record
    assert Steering.from_json(steering.to_json(), "test") == steering


@pytest.mark.parametrize("record,message", [
    ({"layer": 20, "neurons": [1], "factor": float("nan")}, "not a finite number"),
    ({"layer": 20, "neurons": [1], "factor": -1.0}, "must be >= 0"),
    ({"layer": 20, "neurons": [1, 1], "factor": 2.0}, "listed twice"),
    ({"layer": 20, "neurons": ["1"], "factor": 2.0}, "malformed steering record"),
    ({"layer": 20, "factor": 2.0}, "malformed steering record"),
])
def test_bad_steering_records_are_refused(record, message):
    with pytest.raises(UsageError, match=message):
        Steering.from_json(record, "somewhere.json")


def test_delta_statistics_equals_direct_computation(tiny_model, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, they say."]
    layer = 9
    stats = delta_statistics(tiny_model, tokenizer, texts, layer)
    mixer = tiny_model.backbone.layers[layer].mixer
    captured = []
    hook = mixer.dt_proj.register_forward_hook(lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            hidden = tiny_model.backbone.embeddings(ids)
            for block in tiny_model.backbone.layers[: layer + 1]:
                hidden = hidden + reference_mixer(block.mixer, block.norm(hidden))
    finally:
        hook.remove()
    dt_pre = torch.cat(captured).double()
    delta = F.softplus(dt_pre)
    assert stats["num_tokens"] == dt_pre.shape[0]
    torch.testing.assert_close(stats["dt_pre_mean"], dt_pre.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["delta_mean"], delta.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["delta_variance"], delta.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["dt_pre_variance"], dt_pre.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
