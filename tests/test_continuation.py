"""Continuing from a cached context against the full-sequence forward and transformers' own one-token
cached steps, Mamba-1 and Mamba-2."""

import pytest
import torch
import transformers

from delta_steering.model.continuation import blocks_from, continuation_hidden, continues_exactly
from delta_steering.model.mamba1 import block_input
from families import make_tiny

FAMILIES = ["mamba", "falcon_mamba", "mamba2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.manual_seed(1)
    return make_tiny(request.param, vocab_size=60, num_hidden_layers=3)


def sequences(n: int, length: int) -> torch.Tensor:
    return torch.randint(1, 60, (n, length), generator=torch.Generator().manual_seed(n + length))


@torch.no_grad()
@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("context, tail", [(5, 1), (7, 6), (3, 9)])
def test_a_continuation_equals_the_full_forward(model, start, context, tail):
    """Two contexts, each continued by two rows (continuations of its requests), from block `start`:
    the hidden states at the context's last token and every continuation token are the full forward's."""
    ids = sequences(4, context + tail)
    ids[1, :context] = ids[0, :context]  # rows 0, 1 share context A; rows 2, 3 context B
    ids[3, :context] = ids[2, :context]
    hidden = block_input(model, ids, start)
    full = blocks_from(model, start, hidden)[:, context - 1:]
    compact = continuation_hidden(model, start, [hidden[[0, 2], :context]], hidden[:, context:], [0, 0, 1, 1])
    assert compact.shape == full.shape
    # Mamba-1 continues the very recurrence of the full scan; Mamba-2's chunked scan sums in another
    # order when it starts from a state (differences up to 1.9e-5 seen on 2 threads)
    atol = 5e-5 if model.config.model_type == "mamba2" else 1e-5
    torch.testing.assert_close(compact, full, rtol=0, atol=atol)


@torch.no_grad()
def test_a_continuation_equals_transformers_one_token_steps(model):
    """The block continuation gives what transformers' generation path gives token by token."""
    ids = sequences(2, 10)
    context = 6
    cache = transformers.DynamicCache(config=model.config)
    steps = [model.base_model(input_ids=ids[:, :context], cache=cache, use_cache=True).last_hidden_state[:, -1]]
    for position in range(context, ids.shape[1]):
        steps.append(model.base_model(input_ids=ids[:, position: position + 1], cache=cache,
                                      use_cache=True).last_hidden_state[:, 0])
    hidden = block_input(model, ids, 0)
    compact = continuation_hidden(model, 0, [hidden[:, :context]], hidden[:, context:], [0, 1])
    torch.testing.assert_close(compact, torch.stack(steps, dim=1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_mamba1_multi_token_forward_would_restart_the_scan(model):
    """Why Mamba-1 continues in the project's own code: transformers' multi-token forward after a
    prefill starts its scan again from zero, so it does not give the full forward's numbers."""
    if model.config.model_type == "mamba2":
        pytest.skip("Mamba-2's chunked scan starts from the cached state")
    ids = sequences(1, 10)
    cache = transformers.DynamicCache(config=model.config)
    model.base_model(input_ids=ids[:, :6], cache=cache, use_cache=True)
    restarted = model.base_model(input_ids=ids[:, 6:], cache=cache, use_cache=True).last_hidden_state
    full = model.base_model(input_ids=ids).last_hidden_state[:, 6:]
    assert (restarted - full).abs().max() > 1e-3


def test_the_exactness_rule(model):
    assert continues_exactly(model)
    assert not continues_exactly(make_tiny(model.config.model_type, vocab_size=60).to(torch.bfloat16))
    assert not continues_exactly(make_tiny("jamba", vocab_size=60))
