"""Greedy generation for IFEval: no chat template, no special tokens added, stop at EOS.

Prompts are batched with left padding and an attention mask. Mamba zeroes the padded positions
before its convolution and before the SSM input (`apply_mask_to_padding_states`), so the state a
prompt leaves behind, and hence its continuation, does not depend on the padding.
"""

from __future__ import annotations

import torch

from ..model.placement import input_device
from ..progress import tqdm


def default_batch_size(model: torch.nn.Module) -> int:
    """Prompts per batch: Mamba's cache is small, so the prefill activations set the limit."""
    return 32 if input_device(model).type == "cuda" else 8


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int | None = None, progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens, cut at the first EOS.

    Prompts are sorted by length to reduce padding; the results come back in the input order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, not {max_new_tokens}")
    encoded = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("cannot generate from an empty prompt")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = input_device(model)
    batch_size = batch_size or default_batch_size(model)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    outputs: list[str] = [""] * len(prompts)
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch],
                                      device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad)
        for i, row in zip(batch, generated[:, width:].tolist()):
            if eos in row:
                row = row[:row.index(eos)]
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    return outputs
