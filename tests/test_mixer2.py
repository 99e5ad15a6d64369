"""The chunk size Mamba-2's forwards scan at on CPU while requests are scored (`short_chunks`)."""

import pytest
import torch

from delta_steering.model.mamba2 import chunk_size_for, short_chunks
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
