"""What the benchmarks measure on: a model of mamba-130m's or mamba2-130m's shape, or of their 790m
siblings' (random weights, no download), and the requests of the study's six tasks as the project
builds them (the first N discovery documents of each, GPT-NeoX tokenizer), or synthetic requests
with `--synthetic`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import (AutoTokenizer, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM,
                          PreTrainedTokenizerFast)

from delta_steering.engine.batching import Encoded
from delta_steering.engine.scoring import encode_examples
from delta_steering.data.tasks import Example, load_examples

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")  # the study's six
CHOICES = 4  # per synthetic example


def add_arguments(parser: argparse.ArgumentParser, docs: int) -> None:
    """The options both benchmarks share: model, requests, threads."""
    parser.add_argument("--family", default="mamba", choices=["mamba", "mamba2"],
                        help="mamba: mamba-130m's shape; mamba2: mamba2-130m's shape (24 heads a layer)")
    parser.add_argument("--docs", type=int, default=docs, help="discovery documents per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--data_dir", default=str(SHARED_DATA / "tasks_hf"), help="DIR/<task>/<split>.jsonl")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                        help="a tokenizer.json file, or a tokenizer directory or Hub name (the GPT-NeoX-20B one)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random requests instead of the tasks' (4 choices of 2-8 tokens after 56-120 tokens)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the random model's weights")


SHAPES = {"130m": dict(hidden_size=768, num_hidden_layers=24), "790m": dict(hidden_size=1536, num_hidden_layers=48)}


def model_shaped(family: str, dtype: torch.dtype, device: str, seed: int, size: str = "130m"):
    """Random-weight MambaForCausalLM with mamba-130m's (or -790m's) configuration, or Mamba2ForCausalLM
    with mamba2-130m's (or -780m's: hidden 1536, 48 layers) and its heads of 64, state 128, one group."""
    torch.manual_seed(seed)
    common = dict(vocab_size=50280, expand=2, conv_kernel=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                  use_cache=False, **SHAPES[size])
    if family == "mamba2":
        heads = 2 * common["hidden_size"] // 64
        model = Mamba2ForCausalLM(Mamba2Config(state_size=128, head_dim=64, num_heads=heads, n_groups=1,
                                               chunk_size=256, **common))
    else:
        model = MambaForCausalLM(MambaConfig(state_size=16, **common))
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(name: str):
    """The tokenizer, with <|endoftext|> as EOS and pad when it is a bare tokenizer.json."""
    if name.endswith(".json"):
        if not Path(name).is_file():
            sys.exit(f"no tokenizer at {name}: pass --tokenizer (the GPT-NeoX-20B tokenizer.json, directory or name)")
        return PreTrainedTokenizerFast(tokenizer_file=name, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    return AutoTokenizer.from_pretrained(name)


def synthetic_requests(n_docs: int, vocab: int, seed: int) -> tuple[list[Example], list[Encoded]]:
    """Multiple-choice examples of 4 choices: a shared random context of 56-120 tokens, random 2-8
    token choices."""
    rng = np.random.default_rng(seed)
    examples, encoded = [], []
    for doc in range(n_docs):
        context = rng.integers(1, vocab, rng.integers(56, 121)).tolist()
        for _ in range(CHOICES):
            choice = rng.integers(1, vocab, rng.integers(2, 9)).tolist()
            encoded.append(Encoded(tuple(context + choice), len(choice)))
        requests = tuple((f"doc {doc}", f" choice {c}") for c in range(CHOICES))
        examples.append(Example("synthetic", doc, requests, tuple(f"choice {c}" for c in range(CHOICES)),
                                int(rng.integers(CHOICES)), "acc"))
    return examples, encoded


def requests(args: argparse.Namespace, vocab: int):
    """(tokenizer, examples, encoded): the tasks' requests, or synthetic ones (a tokenizer that only pads)."""
    if args.synthetic:
        return (SimpleNamespace(pad_token_id=0), *synthetic_requests(args.docs, vocab, args.seed))
    tokenizer = load_tokenizer(args.tokenizer)
    examples = load_examples(args.tasks, args.data_dir, "discovery", args.docs)
    return tokenizer, examples, encode_examples(tokenizer, examples)


def by_task(examples: list[Example]) -> dict[str, tuple[list[Example], list[int]]]:
    """Each task's examples and the indices of their requests, in first-seen order."""
    out: dict[str, tuple[list[Example], list[int]]] = {}
    start = 0
    for example in examples:
        chosen, rows = out.setdefault(example.task, ([], []))
        chosen.append(example)
        rows.extend(range(start, start + len(example.requests)))
        start += len(example.requests)
    return out


def describe(encoded: list[Encoded]) -> str:
    """Requests, their tokens (range, mean) and target tokens (mean)."""
    lengths = [len(e.tokens) for e in encoded]
    return (f"{len(encoded)} requests of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
            f"{np.mean([e.n_target for e in encoded]):.1f} target tokens on average")


def timed(fn, device: str):
    """fn's result and its wall-clock seconds (synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
