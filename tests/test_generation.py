"""Greedy generation: batching and left padding do not change outputs, EOS stops a sequence, and
steering is active during prefill and cached decoding."""

import copy

import pytest
import torch

from delta_steering.engine.generation import generate_greedy
from delta_steering.model.steering import steer

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France?\nAnswer:",
    "A",
    "Write a poem about the sea.",
    "1 2 3",
]
MAX_NEW_TOKENS = 10


@torch.no_grad()
def greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Reference: one prompt, no padding, no cache; the whole sequence is re-run for each token."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    new = []
    for _ in range(max_new_tokens):
        token = model(input_ids=ids, use_cache=False).logits[0, -1].argmax().item()
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def reference(model, tokenizer, prompts=PROMPTS) -> list[str]:
    return [tokenizer.decode(greedy_ids(model, tokenizer, p), skip_special_tokens=True) for p in prompts]


def test_batched_equals_one_at_a_time_and_the_reference_loop(tiny_model, tokenizer):
    expected = reference(tiny_model, tokenizer)
    assert len({len(tokenizer(p).input_ids) for p in PROMPTS}) == len(PROMPTS)  # padding is exercised
    for batch_size in (1, 2, 4):
        assert generate_greedy(tiny_model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=batch_size,
                               progress=batch_size == 4) == expected


def test_generation_stops_at_eos(tiny_model, tokenizer):
    """A bias on the EOS logit makes some sequences end early (one at once) while others in the same
    batch run to max_new_tokens; nothing after an EOS may appear."""
    model = copy.deepcopy(tiny_model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.3
    model.lm_head = head
    lengths = [len(greedy_ids(model, tokenizer, p)) for p in PROMPTS]
    assert 0 in lengths and MAX_NEW_TOKENS in lengths and any(0 < n < MAX_NEW_TOKENS for n in lengths)
    expected = reference(model, tokenizer)
    for batch_size in (1, 4):
        assert generate_greedy(model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=batch_size) == expected


def test_steering_is_active_in_prefill_and_cached_decoding(tiny_model, tokenizer):
    layer, neurons, factor = 20, list(range(tiny_model.config.intermediate_size)), 10.0
    scaled = copy.deepcopy(tiny_model)
    with torch.no_grad():
        projection = scaled.backbone.layers[layer].mixer.dt_proj
        projection.weight[neurons] *= factor
        projection.bias[neurons] *= factor
    baseline = generate_greedy(tiny_model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=2)
    with steer(tiny_model, layer, neurons, factor):
        steered = generate_greedy(tiny_model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=2)
    assert steered != baseline
    assert steered == reference(scaled, tokenizer)
    assert generate_greedy(tiny_model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=2) == baseline


def test_bad_arguments(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_greedy(tiny_model, tokenizer, ["A", ""], MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(tiny_model, tokenizer, ["A"], 0)
