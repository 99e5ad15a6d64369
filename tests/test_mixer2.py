"""The chunk size Mamba-2's forwards scan at on CPU while requests are scored (`short_chunks`), and the
one-token cached step that generation uses there (`lean_state_update`: the state updated in place,
with less arithmetic), against transformers' own functions."""

import sys

import pytest
import torch

from delta_steering.model.mamba2 import (LEAN, chunk_size_for, in_place_scan, lean_state_update, short_chunks,
                                         state_update)
from delta_steering.model.sites import decoder_layers
from families import make_tiny


@pytest.mark.parametrize("tokens, configured, expected", [
    (10, 256, 32), (128, 256, 32), (129, 256, 64), (300, 256, 128), (1000, 256, 256), (5000, 256, 256),
    (100, 4, 4), (100, 64, 32)])
def test_the_chunk_is_the_smallest_power_of_two_from_32_with_at_most_four_chunks_never_above_the_models(
        tokens, configured, expected):
    assert chunk_size_for(tokens, configured) == expected


def chunk_sizes(model) -> set[int]:
    return {block.mixer.chunk_size for block in decoder_layers(model)}


def test_short_chunks_set_and_restore_even_on_error():
    model = make_tiny("mamba2", num_hidden_layers=2, chunk_size=256)
    with pytest.raises(RuntimeError):
        with short_chunks(model, 40):
            assert chunk_sizes(model) == {32}
            raise RuntimeError("interrupted")
    assert chunk_sizes(model) == {256}


def every_chunk_size(model) -> list[int]:
    return [module.chunk_size for module in model.modules() if hasattr(module, "chunk_size")]


@pytest.mark.parametrize("family", ["bamba", "zamba2", "nemotron_h"])
def test_other_families_are_left_alone(family):
    model = make_tiny(family)
    before = every_chunk_size(model)
    assert before  # their Mamba-2 mixers have a chunk size too
    with short_chunks(model, 40):
        assert every_chunk_size(model) == before


def test_mixers_that_compute_on_a_gpu_keep_the_configured_chunk():
    """A model spread over devices (accelerate's hooks say where each module computes): only the mixers
    that compute on the CPU scan in short chunks."""
    from accelerate.hooks import AlignDevicesHook

    model = make_tiny("mamba2", num_hidden_layers=2, chunk_size=256)
    model.backbone.layers[1].mixer._hf_hook = AlignDevicesHook(execution_device=torch.device("cuda:0"))
    with short_chunks(model, 40):
        assert [block.mixer.chunk_size for block in model.backbone.layers] == [32, 256]
    assert chunk_sizes(model) == {256}


def update_inputs(batch=3, heads=8, head_dim=16, size=32, groups=2, seed=0):
    """A one-token step's arguments, expanded as transformers' `mamba2_scan_forward` passes them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    A = -torch.rand(heads, generator=g) * 4
    return dict(state=r(batch, heads, head_dim, size), x=r(batch, heads, head_dim),
                dt=r(batch, 1, heads).transpose(1, 2).expand(-1, -1, head_dim),
                A=A[:, None, None].expand(-1, head_dim, size), B=r(batch, groups, size), C=r(batch, groups, size),
                D=r(heads)[:, None].expand(-1, head_dim), dt_bias=r(heads)[:, None].expand(-1, head_dim))


def transformers_update():
    from transformers.models.mamba2 import modeling_mamba2
    return modeling_mamba2.mamba2_selective_state_update


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_the_lean_state_update_gives_transformers_numbers_bit_for_bit(groups):
    """Output and the state updated in place, against transformers' own reference on the same inputs."""
    reference = transformers_update()
    theirs, ours = update_inputs(groups=groups), update_inputs(groups=groups)

    def call(update, a):  # as mamba2_scan_forward calls it
        return update(*(a[k] for k in ("state", "x", "dt", "A", "B", "C", "D")), dt_bias=a["dt_bias"], dt_softplus=True)

    expected, got = call(reference, theirs), call(state_update(reference), ours)
    assert torch.equal(got, expected)
    assert torch.equal(ours["state"], theirs["state"])
    assert not torch.equal(ours["state"], update_inputs(groups=groups)["state"])  # it was updated


def test_inputs_the_lean_update_does_not_cover_go_to_the_reference():
    calls = []

    def reference(*args, **kwargs):
        calls.append(args[0].dtype)
        return "reference"

    update = state_update(reference)
    half = {k: v.bfloat16() for k, v in update_inputs().items()}
    assert update(*half.values()) == "reference"
    unexpanded = update_inputs()
    unexpanded["dt"] = unexpanded["dt"].contiguous()
    assert update(*unexpanded.values()) == "reference"
    assert calls == [torch.bfloat16, torch.float32]


def transformers_functions() -> tuple:
    """transformers' Mamba-2 module and the functions `lean_state_update` replaces in it."""
    module = sys.modules[transformers_update().__module__]
    return module, tuple(getattr(module, name) for name in LEAN)


def test_lean_state_update_patches_mamba2_alone_and_restores_even_on_error():
    module, references = transformers_functions()

    def current():
        return tuple(getattr(module, name) for name in LEAN)

    with lean_state_update(make_tiny("bamba")):
        assert current() == references
    model = make_tiny("mamba2", num_hidden_layers=2)
    with pytest.raises(RuntimeError):
        with lean_state_update(model):
            lean = current()
            assert all(a is not b for a, b in zip(lean, references))
            with lean_state_update(model):  # opened inside: unchanged, and left so on exit
                assert current() == lean
            assert current() == lean
            raise RuntimeError("interrupted")
    assert current() == references


def cached_steps(model, lean: bool, steps: int = 4, seed: int = 0):
    """A prompt batch read, then `steps` one-token cached steps: each step's logits and the cache."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, logits = out.past_key_values, []
        for _ in range(steps):
            token = torch.randint(0, model.config.vocab_size, (3, 1), generator=g)
            if lean:
                with lean_state_update(model):
                    logits.append(model(input_ids=token, cache=cache, use_cache=True).logits)
            else:
                logits.append(model(input_ids=token, cache=cache, use_cache=True).logits)
    return logits, cache


def test_a_lean_model_steps_with_transformers_numbers_bit_for_bit(monkeypatch):
    """Logits, SSM states and conv windows after cached steps, with and without `lean_state_update`,
    on a float32 model of two groups; no step falls back to transformers' state update."""
    module, (reference, _) = transformers_functions()
    fallbacks = []

    def counted(*args, **kwargs):
        fallbacks.append(args[0].shape)
        return reference(*args, **kwargs)

    model = make_tiny("mamba2", num_hidden_layers=2)
    theirs, their_cache = cached_steps(model, lean=False)
    monkeypatch.setattr(module, LEAN[0], counted)
    ours, our_cache = cached_steps(model, lean=True)
    assert fallbacks == []
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for layer in range(2):
        assert torch.equal(our_cache.get_recurrent_state(layer), their_cache.get_recurrent_state(layer))
        assert torch.equal(our_cache.get_conv_state(layer), their_cache.get_conv_state(layer))


def test_the_in_place_scan_takes_one_token_cached_steps_alone_and_leaves_the_rest_to_transformers(monkeypatch):
    """A prompt read, a cache that records its past (for rolling back) and a step without a cache go
    to transformers' scan; a one-token cached step updates the cache's state tensor itself."""
    module, (update, reference) = transformers_functions()
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape[1])  # the tokens scanned
        return reference(*args, **kwargs)

    model = make_tiny("mamba2", num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        state = cache.get_recurrent_state(0)
        before = state.clone()
        monkeypatch.setattr(module, LEAN[1], in_place_scan(spy, state_update(update)))
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        assert calls == [] and cache.get_recurrent_state(0) is state and not torch.equal(state, before)
        model(input_ids=ids, use_cache=False)
        model(input_ids=ids, use_cache=True)
        cache.is_recording_past = lambda layer: True
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert calls == [5, 5, 1]
