"""Greedy generation: continuous batching (rows refilled from the queue, each with its own state)
gives model.generate's tokens prompt by prompt on every SSM-only family, the hybrids keep static
batches; EOS stops a sequence; steering is active during prefill and cached decoding; the cache is
used whatever the checkpoint's config says; the batch size is measured."""

import copy
from collections import deque

import pytest
import torch
from families import TINY, make_tiny
from transformers import AutoModelForCausalLM

from delta_steering.engine import generation
from delta_steering.engine.generation import batch_size_for, generate_greedy
from delta_steering.model.continuation import has_ssm_cache
from delta_steering.model.steering import steer

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France?\nAnswer:",
    "A",
    "Write a poem about the sea.",
    "1 2 3",
]
MAX_NEW_TOKENS = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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


@torch.no_grad()
def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """model.generate on one prompt (no padding), cut at EOS."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, use_cache=True)[0, ids.shape[1]:].tolist()
    return row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row


@torch.no_grad()
def ending_early(model, tokenizer, prompts: list[str], share: float = 0.15):
    """A copy of the model whose output head has a bias on EOS that makes EOS the greedy token at
    about `share` of the prompts' positions, so that responses end after varying lengths."""
    model = copy.deepcopy(model)
    eos = tokenizer.eos_token_id
    gaps = []
    for prompt in prompts:
        logits = model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids).logits[0]
        others = logits.clone()
        others[:, eos] = -torch.inf
        gaps.append(others.max(-1).values - logits[:, eos])
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.copy_(model.lm_head.weight)
    head.bias.zero_()
    head.bias[eos] = torch.quantile(torch.cat(gaps), share).item()
    model.lm_head = head
    return model


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


def one_token_forwards(model) -> tuple[list, object]:
    """A list that receives the (rows, tokens) shape of every forward's input ids, and the hook."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _o: shapes.append(inputs[0].shape))
    return shapes, hook


def test_finished_rows_are_refilled_from_the_queue(tiny_model, tokenizer, monkeypatch):
    """12 prompts on 3 rows with responses of varying length: each prompt's tokens are
    model.generate's alone, every step after a prefill reads one token per row, and there are
    fewer steps than static batches of 3 would take (each running to its longest response)."""
    prompts = [p + suffix for suffix in ("", " and", " then") for p in PROMPTS][:12]
    model = ending_early(tiny_model, tokenizer, prompts)
    alone = [generate_alone(model, tokenizer, p, 12) for p in prompts]
    lengths = [len(ids) + (len(ids) < 12) for ids in alone]  # steps each prompt needs (its EOS included)
    assert len(set(lengths)) >= 4
    shapes, hook = one_token_forwards(model)
    prefilled = []  # indices of the shapes recorded by prefills (a one-token prompt's is (rows, 1) too)
    real_prefill = generation.prefill

    def prefill(*args):
        start = len(shapes)
        out = real_prefill(*args)
        prefilled.extend(range(start, len(shapes)))
        return out

    monkeypatch.setattr(generation, "prefill", prefill)
    try:
        out = generate_greedy(model, tokenizer, prompts, 12, batch_size=3)
    finally:
        hook.remove()
    assert out == [tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    steps = [s for k, s in enumerate(shapes) if k not in set(prefilled)]
    assert all(s[1] == 1 for s in steps)
    assert all(s[0] <= 3 for s in steps)
    by_length = sorted(range(12), key=lambda i: len(tokenizer(prompts[i]).input_ids))
    static_steps = sum(max(lengths[i] for i in by_length[k:k + 3]) - 1 for k in range(0, 12, 3))
    assert len(steps) < static_steps
    assert sum(s[0] for s in steps) == sum(n - 1 for n in lengths)  # no finished row keeps stepping


def test_prefill_batches_keep_rows_budget_and_padding_bounds():
    """Prompts are taken shortest first, at most `rows` and `budget` padded tokens a batch, padding at
    most PAD_WASTE x their own tokens; every prompt is taken once, in order."""
    lengths = [16, 18, 20, 21, 30, 31, 40, 41, 42, 107, 300]
    encoded = [[0] * n for n in lengths]

    def batches(rows: int, budget: int) -> list[list[int]]:
        queue, out = deque(range(len(lengths))), []
        while queue:
            out.append(generation.next_prefill(queue, encoded, rows, budget))
        assert [i for b in out for i in b] == list(range(len(lengths)))
        for batch in out:
            padded, own = len(batch) * lengths[batch[-1]], sum(lengths[i] for i in batch)
            assert len(batch) <= rows
            assert len(batch) == 1 or (padded <= budget and padded <= generation.PAD_WASTE * own)
        return out

    # rows bound the first two; 42 with 107 would pad 149 tokens to 214, 107 with 300 407 to 600
    assert batches(rows=4, budget=1000) == [[0, 1, 2, 3], [4, 5, 6, 7], [8], [9], [10]]
    # the budget alone: 16-21 would be 84 padded tokens (1.12x their own)
    assert batches(rows=16, budget=80)[0] == [0, 1, 2]


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_generates_what_model_generate_does_prompt_by_prompt(family, tokenizer, capsys):
    """SSM-only families by continuous batching, hybrids in static batches (saying so once); both
    give model.generate's tokens for each prompt alone, with responses ending at varying lengths."""
    model = ending_early(make_tiny(family, vocab_size=len(tokenizer)), tokenizer, PROMPTS * 2)
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    alone = [generate_alone(model, tokenizer, p) for p in prompts]
    assert len({len(ids) for ids in alone}) >= 2
    capsys.readouterr()
    for _ in range(2):
        assert generate_greedy(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=3) == \
            [tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    printed = capsys.readouterr().out
    assert has_ssm_cache(model) == (family in ("mamba", "falcon_mamba", "mamba2"))
    assert printed.count("static batches") == (0 if has_ssm_cache(model) else 1)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "bamba"])
def test_the_cache_is_used_whatever_the_config_says(family, tokenizer, tmp_path):
    """A checkpoint saved with use_cache false in config.json and generation_config.json generates
    with the cache all the same (every forward after a prefill reads one token per row), with the
    same tokens."""
    model = make_tiny(family, vocab_size=len(tokenizer))
    expected = generate_greedy(model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=2)
    model.config.use_cache = False
    model.generation_config.use_cache = False
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.use_cache is False and loaded.generation_config.use_cache is False
    shapes, hook = one_token_forwards(loaded)
    try:
        assert generate_greedy(loaded, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=2) == expected
    finally:
        hook.remove()
    prefills = [s for s in shapes if s[1] > 1]
    assert len(prefills) <= 3 and len(shapes) > len(prefills) + MAX_NEW_TOKENS - 1


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


def test_the_batch_size_doubles_while_it_pays_within_memory(tiny_model, monkeypatch):
    """With a step costing 1 + r/8 (rows r), rows per second gain >= 10% per doubling from the
    static batch size 8 up to 64 rows (x1.33, x1.2, x1.11) and not beyond (x1.06); memory caps it,
    below 8 too; it is measured once per model."""
    model = copy.deepcopy(tiny_model)
    calls = []
    monkeypatch.setattr(generation, "step_seconds", lambda _m, rows: calls.append(rows) or 1 + rows / 8)
    monkeypatch.setattr(generation, "memory_rows", lambda _m: 1000)
    assert batch_size_for(model) == 64
    assert calls == [8, 16, 32, 64, 128]
    assert batch_size_for(model) == 64 and len(calls) == 5
    for memory, rows in ((20, 16), (5, 5)):
        monkeypatch.setattr(generation, "memory_rows", lambda _m, memory=memory: memory)
        assert batch_size_for(copy.deepcopy(tiny_model)) == rows


def test_the_measured_batch_size_fits_in_memory(tiny_model):
    rows = batch_size_for(copy.deepcopy(tiny_model))
    assert 8 <= rows <= min(generation.MAX_BATCH, generation.memory_rows(tiny_model))
    assert rows & (rows - 1) == 0
    state = generation.state_bytes(tiny_model)
    layer = tiny_model.backbone.layers[0].mixer
    assert state == 24 * 4 * layer.intermediate_size * (layer.conv_kernel_size + layer.ssm_state_size)


def test_bad_arguments(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_greedy(tiny_model, tokenizer, ["A", ""], MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(tiny_model, tokenizer, ["A"], 0)
