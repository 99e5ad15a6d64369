"""The chunk size Mamba-2's forwards scan at on CPU while requests are scored (`short_chunks`), and the
one-token state update that generation uses there (`lean_state_update`)."""

import sys

import pytest
import torch

from delta_steering.model.mamba2 import chunk_size_for, lean_state_update, short_chunks, state_update
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


def test_lean_state_update_patches_mamba2_alone_and_restores_even_on_error():
    reference = transformers_update()
    module = sys.modules[reference.__module__]
    with lean_state_update(make_tiny("bamba")):
        assert module.mamba2_selective_state_update is reference
    model = make_tiny("mamba2", num_hidden_layers=2)
    with pytest.raises(RuntimeError):
        with lean_state_update(model):
            lean = module.mamba2_selective_state_update
            assert lean is not reference
            with lean_state_update(model):  # opened inside: unchanged, and left so on exit
                assert module.mamba2_selective_state_update is lean
            assert module.mamba2_selective_state_update is lean
            raise RuntimeError("interrupted")
    assert module.mamba2_selective_state_update is reference
