"""Tiny offline Mamba models and tokenizers for the tests (no Hub, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

from delta_steering.data.tasks import Example

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "A man is sitting on a roof. He starts pulling up roofing.",
    "Write a poem about the sea. Do not use any commas in your response.",
    "1 2 3 4 5 6 7 8 9 10 apples, oranges; bananas! cherries? \"quotes\" (brackets)",
    "In the beginning the state space model read every token once and kept a small memory.",
] * 4


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with <|endoftext|> as EOS and pad, id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_config(vocab_size: int, **overrides) -> MambaConfig:
    settings = dict(vocab_size=vocab_size, hidden_size=16, state_size=4, num_hidden_layers=24, expand=2,
                    conv_kernel=4, time_step_rank=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                    time_step_init_scheme="random", time_step_scale=1.0, use_cache=True)
    settings.update(overrides)
    return MambaConfig(**settings)


def make_model(tokenizer, seed: int = 0, **overrides) -> MambaForCausalLM:
    """A randomly initialised tiny 24-layer Mamba with perturbed SSM weights (so neurons differ)."""
    torch.manual_seed(seed)
    model = MambaForCausalLM(make_config(len(tokenizer), **overrides))
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.dt_proj.bias.add_(torch.randn_like(block.mixer.dt_proj.bias))
            block.mixer.D.add_(0.5 * torch.randn_like(block.mixer.D))
            # the default init is so small that no neuron matters; larger is chaotic in fp32
            block.mixer.in_proj.weight.mul_(2)
            block.mixer.x_proj.weight.mul_(5)
            block.mixer.out_proj.weight.mul_(2)
        model.backbone.embeddings.weight.mul_(2)
    return model.eval()


def save_tiny(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model and its tokenizer in HF format to `directory`."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def scaled_rows(model, layer: int, neurons: list[int], factor: float):
    """A copy of the model with rows `neurons` of layer `layer`'s dt_proj (weight and bias) scaled by
    `factor`, edited directly: the reference that steering must equal."""
    import copy

    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.backbone.layers[layer].mixer.dt_proj.weight[neurons] *= factor
        edited.backbone.layers[layer].mixer.dt_proj.bias[neurons] *= factor
    return edited


def near_tie_task(model, tokenizer, path: Path, n: int = 24, seed: int = 0) -> Path:
    """Write a custom task file of two-choice questions on which the model nearly ties, so that
    steering one delta neuron flips some answers (random tiny models are otherwise too sure).
    The gold label is the model's own preference for two thirds of the questions."""
    import json
    import random

    from delta_steering.engine.scoring import encode_pair, loglikelihoods

    words = ("the quick brown fox jumps over lazy dog capital France Paris sea poem roof man apples "
             "oranges bananas cherries state space model token memory").split()
    rng = random.Random(seed)
    candidates = []
    while len(candidates) < 300:
        context = " ".join(rng.choice(words) for _ in range(5))
        a, b = rng.sample(words, 2)
        candidates.append((context, " " + a, " " + b))
    encoded = [encode_pair(tokenizer, c, x) for c, *choices in candidates for x in choices]
    logprob, _ = loglikelihoods(model, tokenizer, encoded)
    margin = logprob[0::2] - logprob[1::2]
    chosen = sorted(range(len(candidates)), key=lambda i: abs(margin[i]))[:n]
    with open(path, "w") as f:
        for k, i in enumerate(chosen):
            preferred = int(margin[i] < 0)
            label = preferred if k % 3 else 1 - preferred
            f.write(json.dumps({"context": candidates[i][0], "choices": list(candidates[i][1:]), "label": label}) + "\n")
    return Path(path)


def make_examples() -> list[Example]:
    """Multiple-choice examples whose choices share a context (and differ in length), acc_norm, and
    single-request greedy examples, as the built-in tasks produce them."""
    examples = [Example("mc", i, tuple((f"Question: what is {i} plus one?\nAnswer:", c) for c in choices),
                        tuple(c.strip() for c in choices), i % 3, "acc")
                for i, choices in enumerate([(" 1", " apples and oranges", " the fox"),
                                             (" 2", " two", " the lazy dog jumps"),
                                             (" three", " 3", " Paris")])]
    examples.append(Example("norm", 0, (("Pick one:", " a"), ("Pick one:", " a much longer choice")),
                            ("a", "a much longer choice"), 1, "acc_norm"))
    examples.append(Example("lambada", 0, (("The quick brown fox jumps over the lazy", " dog."),), ("dog.",), 0,
                            "greedy"))
    examples.append(Example("lambada", 1, (("In the beginning the state space", " model"),), ("model",), 0,
                            "greedy"))
    return examples
