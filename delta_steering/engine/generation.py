"""Greedy generation for IFEval: no chat template, no special tokens added, stop at EOS.

An SSM-only model (mamba, falcon_mamba, mamba2 with transformers' 5.x cache) generates with
continuous batching. A sequence's whole memory is a fixed-size conv window and SSM state per layer,
so a row whose response has ended is refilled at once with the next prompt: the prompt's state is
copied into that row of the cache, and the rows step on together, one token each per forward.
When no prompt is left, finished rows are dropped. Prompts are read (prefilled) in batches, ahead
of need, shortest first, a batch padding at most a quarter more tokens than its prompts hold
(`next_prefill`), left-padded with an attention mask: Mamba zeroes the padded positions before its
convolution and before the SSM input (`apply_mask_to_padding_states`), so the state a prompt leaves
does not depend on the padding. Each step is the model's own forward with its own cache, the
one-token cached step that `model.generate` takes, without `generate`'s per-step machinery (and, for
Mamba-2, the state updated in place, on CPU with less arithmetic, for the same numbers:
`mamba2.lean_state_update`); the responses are therefore `model.generate`'s for each prompt alone,
up to the float rounding of batched arithmetic. The cache is passed explicitly, so a checkpoint
whose config or generation config says `use_cache: false` generates exactly as fast.

The rows per step are measured (`batch_size_for`): a step costs little more for many rows than for
a few until the matrix multiplies saturate the device, so the batch doubles while that pays, within
a share of the free memory.

Hybrids (attention layers, whose key/value cache grows with each row's own length) cannot refill a
row; they generate in static batches through `model.generate`, the cache on, saying so once.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..model.continuation import has_ssm_cache, merged_cache
from ..model.loading import free_bytes
from ..model.mamba2 import lean_state_update, short_chunks
from ..model.placement import input_device
from ..model.sites import SSM_ONLY_FAMILIES, decoder_layers, family_of
from ..progress import tqdm
from .batching import token_budget

MAX_BATCH = 256  # the most rows per step measured
SATURATED = 1.1  # a doubling of the rows that gains less than this factor in rows per second stops the search
MEMORY_SHARE = 0.25  # of the free memory (GPU, or the machine's on CPU), for the rows' states
PAD_WASTE = 1.25  # a prefill batch's padded tokens over its prompts' own tokens, at most

_BATCH_SIZES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()
_NOTED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def default_batch_size(model: torch.nn.Module) -> int:
    """Prompts per static batch (hybrids), and the least rows continuous batching measures from."""
    return 32 if input_device(model).type == "cuda" else 8


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int | None = None, progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens, cut at the first EOS, in
    the input order. `batch_size`: rows per step (default: measured, see `batch_size_for`)."""
    new = generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int | None = None, progress: bool = False) -> list[list[int]]:
    """Each prompt's greedy new tokens, EOS excluded: `generate_greedy` before decoding."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, not {max_new_tokens}")
    encoded = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("cannot generate from an empty prompt")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if has_ssm_cache(model):
        with lean_state_update(model):
            rows = batch_size or min(batch_size_for(model), len(prompts))
            return continuous(model, encoded, max_new_tokens, eos, pad, rows, progress)
    if model not in _NOTED:
        _NOTED.add(model)
        print(f"note: continuous batching covers {', '.join(SSM_ONLY_FAMILIES)} models (a fixed-size state per "
              f"row); this {family_of(model).name} model generates in static batches")
    return static(model, encoded, max_new_tokens, eos, pad, batch_size or default_batch_size(model), progress)


def left_padded(encoded: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest, and their attention mask."""
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    return ids, mask


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


def static(model, encoded: list[list[int]], max_new_tokens: int, eos: int, pad: int, batch_size: int,
           progress: bool) -> list[list[int]]:
    """`model.generate` on batches of prompts sorted by length, the cache on whatever the config says."""
    device = input_device(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        ids, mask = left_padded([encoded[i] for i in batch], pad, device)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True)
        for i, row in zip(batch, generated[:, ids.shape[1]:].tolist()):
            out[i] = until_eos(row, eos)
    return out


@dataclass
class Waiting:
    """A prompt read and waiting for a row: its state is row `row` of `source`."""

    prompt: int
    source: DynamicCache
    row: int


@torch.no_grad()
def prefill(model, encoded: list[list[int]], pad: int) -> tuple[DynamicCache, list[int]]:
    """Read prompts in one left-padded forward: a cache of their states and each one's first new token.
    A Mamba-2 model on CPU scans them in chunks fitted to their length (`mamba2.short_chunks`, the
    same recurrence; transformers' 256-token chunks cost a short prompt what 256 tokens do)."""
    ids, mask = left_padded(encoded, pad, input_device(model))
    cache = DynamicCache(config=model.config)
    with short_chunks(model, ids.shape[1]):
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits
    return cache, logits[:, -1].argmax(-1).tolist()


def gathered(model, entries: list[Waiting]) -> DynamicCache:
    """One cache whose rows are the entries' states, in order."""
    return merged_cache(model, [RowView(e.source, e.row) for e in entries])


class RowView:
    """One row of a cache, read through the Cache API (what `merged_cache` reads)."""

    def __init__(self, cache: DynamicCache, row: int):
        self.cache, self.row = cache, row

    def get_conv_state(self, layer: int) -> torch.Tensor:
        return self.cache.get_conv_state(layer)[self.row:self.row + 1]

    def get_recurrent_state(self, layer: int) -> torch.Tensor:
        return self.cache.get_recurrent_state(layer)[self.row:self.row + 1]


def seat(cache: DynamicCache, rows: list[int], entries: list[Waiting], layers: int) -> None:
    """Copy each entry's state into its row of the running cache, source by source."""
    for source in {id(e.source): e.source for e in entries}.values():
        pairs = [(row, e.row) for row, e in zip(rows, entries) if e.source is source]
        device = source.get_conv_state(0).device
        into = torch.tensor([p[0] for p in pairs], device=device)
        taken = torch.tensor([p[1] for p in pairs], device=device)
        for layer in range(layers):
            cache.get_conv_state(layer)[into] = source.get_conv_state(layer)[taken]
            cache.get_recurrent_state(layer)[into] = source.get_recurrent_state(layer)[taken]


def next_prefill(queue: deque, encoded: list[list[int]], rows: int, budget: int) -> list[int]:
    """Take from `queue` (prompt indices, shortest first) the next prompts to read in one forward: at
    most `rows`, at most `budget` padded tokens, padded tokens at most `PAD_WASTE` x their own (the
    first 100 IFEval prompts in one batch would pad to 2.3x)."""
    chunk = [queue.popleft()]
    own = len(encoded[chunk[0]])
    while queue and len(chunk) < rows:
        width = len(encoded[queue[0]])  # the longest so far, prompts coming shortest first
        if (len(chunk) + 1) * width > min(budget, PAD_WASTE * (own + width)):
            break
        own += width
        chunk.append(queue.popleft())
    return chunk


def continuous(model, encoded: list[list[int]], max_new_tokens: int, eos: int, pad: int, batch_size: int,
               progress: bool) -> list[list[int]]:
    """Each prompt's new tokens (EOS excluded) by continuous batching of `batch_size` rows (see the
    module docstring). Prompts are read shortest first, so a prefill batch pads little."""
    device = input_device(model)
    layers = len(decoder_layers(model))
    new: list[list[int]] = [[] for _ in encoded]
    queue = deque(sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    waiting: deque[Waiting] = deque()
    budget = token_budget(model, max(len(e) for e in encoded))
    bar = tqdm(total=len(encoded), desc="generating", unit="prompt", disable=not progress)

    def goes_on(prompt: int, token: int) -> bool:
        """Record `token` for `prompt`; whether its response continues."""
        if token != eos:
            new[prompt].append(token)
        if token == eos or len(new[prompt]) == max_new_tokens:
            bar.update()
            return False
        return True

    def read_more() -> None:
        """Prefill the next `batch_size` prompts of the queue, in forwards of at most `budget` tokens."""
        while queue and len(waiting) < batch_size:
            chunk = next_prefill(queue, encoded, batch_size, budget)
            cache, first = prefill(model, [encoded[p] for p in chunk], pad)
            waiting.extend(Waiting(p, cache, row) for row, (p, token) in enumerate(zip(chunk, first))
                           if goes_on(p, token))

    def take(k: int) -> list[Waiting]:
        out = []
        while len(out) < k and (waiting or queue):
            if not waiting:
                read_more()
            while waiting and len(out) < k:
                out.append(waiting.popleft())
        return out

    entries = take(batch_size)
    live = [e.prompt for e in entries]  # the prompt of each row of the running cache
    cache = gathered(model, entries) if entries else None
    while live:
        inputs = torch.tensor([new[p][-1] for p in live], device=device)[:, None]
        produced = model(input_ids=inputs, cache=cache, use_cache=True).logits[:, -1].argmax(-1).tolist()
        free = [row for row, (p, token) in enumerate(zip(live, produced)) if not goes_on(p, token)]
        if not free:
            continue
        entries = take(len(free))
        seat(cache, free[:len(entries)], entries, layers)
        for row, e in zip(free, entries):
            live[row] = e.prompt
        if len(entries) < len(free):  # no prompt left: drop the finished rows
            keep = sorted(set(range(len(live))) - set(free[len(entries):]))
            live = [live[row] for row in keep]
            if live:
                cache.reorder_cache(torch.tensor(keep, device=device))
    bar.close()
    return new


def state_bytes(model) -> int:
    """Bytes of one sequence's cache (every layer's conv window and SSM state)."""
    cache, _ = prefill(model, [[0]], 0)
    layers = len(decoder_layers(model))
    return sum(t.numel() * t.element_size() for layer in range(layers)
               for t in (cache.get_conv_state(layer), cache.get_recurrent_state(layer)))


def memory_rows(model) -> int:
    """Rows whose states fit `MEMORY_SHARE` of the free memory: each row's state three times (the
    running cache, a prompt read ahead, the step's temporaries)."""
    device = input_device(model)
    free = free_bytes((device.index or 0) if device.type == "cuda" else "cpu")
    return max(1, int(MEMORY_SHARE * free // (3 * state_bytes(model))))


@torch.no_grad()
def step_seconds(model, rows: int) -> float:
    """Seconds of one cached step of `rows` rows as generation takes it (after one untimed step)."""
    device = input_device(model)
    cache, _ = prefill(model, [[0, 0]] * rows, 0)
    inputs = torch.zeros(rows, 1, dtype=torch.long, device=device)
    seconds = []
    with lean_state_update(model):
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(input_ids=inputs, cache=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


@torch.no_grad()
def batch_size_for(model) -> int:
    """Rows per step for continuous batching: doubled from the static batch size (8 on CPU, 32 on
    CUDA: a row costs no more than it did there) while a doubling gains at least 10% in rows per
    second, within `memory_rows` and `MAX_BATCH`; measured once per model, dtype and device."""
    key = f"{model.dtype} {input_device(model)}"
    sizes = _BATCH_SIZES.setdefault(model, {})
    if key not in sizes:
        limit = min(MAX_BATCH, memory_rows(model))
        best = min(default_batch_size(model), limit)
        rate = best / step_seconds(model, best)
        while best * 2 <= limit:
            doubled = best * 2 / step_seconds(model, best * 2)
            if doubled < SATURATED * rate:
                break
            best, rate = best * 2, doubled
        sizes[key] = best
    return sizes[key]
