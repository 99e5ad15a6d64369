"""Log-likelihood scoring of continuations, as lm-evaluation-harness computes it (SPEC §3).

Context and continuation are tokenised the lm-eval way (trailing spaces of the context move to the
continuation, the pair is encoded whole and split at the context's length, no special tokens, an
empty context is preceded by EOS). Sequences are right-padded; Mamba is causal, so padding never
reaches a scored position. The LM head runs only where a continuation token is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .tasks import Example, task_names


@dataclass(frozen=True)
class Encoded:
    """One request as token ids: the model reads `tokens[:-1]` and predicts the last `n_target`."""

    tokens: tuple[int, ...]
    n_target: int


def encode_pair(tokenizer, context: str, continuation: str) -> Encoded:
    if not context:
        target = tokenizer.encode(continuation, add_special_tokens=False)
        return Encoded((tokenizer.eos_token_id, *target), len(target))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    return Encoded(tuple(whole), len(whole) - n_context)


def encode_examples(tokenizer, examples: list[Example]) -> list[Encoded]:
    """Every request of every example, example by example, choice by choice."""
    return [encode_pair(tokenizer, c, t) for e in examples for c, t in e.requests]


def token_budget(model, max_len: int) -> int:
    """Tokens per forward pass that fit comfortably: the reference scan keeps two
    batch x tokens x intermediate x state tensors per layer."""
    per_token = 2 * model.config.intermediate_size * model.config.state_size * 4 * 3
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.5 * free / per_token)
    else:
        budget = 2**28 // per_token
    return max(max_len, budget)


def make_batches(encoded: list[Encoded], batch_size: int | None, budget: int) -> list[list[int]]:
    """Indices of requests grouped longest first, `batch_size` per batch or as many as fit `budget` tokens."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].tokens), i))
    batches, current = [], []
    for i in order:
        width = len(encoded[(current or [i])[0]].tokens) - 1  # the first is the longest
        full = len(current) >= batch_size if batch_size else (len(current) + 1) * width > budget
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(encoded: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, list[int]]:
    """Right-padded model inputs (each sequence minus its last token) and their lengths."""
    lengths = [len(e.tokens) - 1 for e in encoded]
    ids = torch.full((len(encoded), max(lengths)), pad_id, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : lengths[row]] = torch.tensor(e.tokens[:-1])
    return ids.to(device), lengths


def target_scores(lm_head, hidden: torch.Tensor, encoded: list[Encoded], lengths: list[int]):
    """Summed log-prob and all-greedy flag of each request's target tokens, from final hidden states
    (batch x tokens x hidden, after the final norm). The LM head runs on target positions only."""
    rows = [r for r, e in enumerate(encoded) for _ in range(e.n_target)]
    positions = [p for e, n in zip(encoded, lengths) for p in range(n - e.n_target, n)]
    targets = torch.tensor([t for e in encoded for t in e.tokens[-e.n_target:]], device=hidden.device)
    logits = lm_head(hidden[rows, positions].to(lm_head.weight.dtype)).float()  # residual_in_fp32: fp32 hidden
    token_logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    token_ok = torch.isfinite(logits).all(-1)
    token_greedy = (logits.argmax(-1) == targets) & token_ok
    owner = torch.tensor(rows, device=hidden.device)

    def per_request(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(encoded), dtype=torch.float64, device=hidden.device).index_add_(0, owner, values.double())

    finite = per_request((~token_ok).double()) == 0
    greedy = per_request((~token_greedy).double()) == 0
    logprob = torch.where(finite, per_request(token_logprob), torch.nan)
    return logprob.cpu().numpy(), greedy.cpu().numpy()


@torch.no_grad()
def loglikelihoods(model, tokenizer, encoded: list[Encoded], batch_size: int | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob (NaN where logits are not finite) and greedy flag of every request."""
    device = next(model.parameters()).device
    batches = make_batches(encoded, batch_size, token_budget(model, max(len(e.tokens) for e in encoded)))
    logprob = np.full(len(encoded), np.nan)
    greedy = np.zeros(len(encoded), dtype=bool)
    for batch in tqdm(batches, desc="scoring", disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        hidden = model.backbone(input_ids=ids, use_cache=False).last_hidden_state
        values, flags = target_scores(model.lm_head, hidden, items, lengths)
        logprob[batch], greedy[batch] = values, flags
    return logprob, greedy


def correctness(examples: list[Example], logprob: np.ndarray, greedy: np.ndarray) -> np.ndarray:
    """Per example: 1.0 correct, 0.0 wrong, NaN when its logits were not finite."""
    out, start = np.zeros(len(examples)), 0
    for k, example in enumerate(examples):
        n = len(example.requests)
        lls, flags = logprob[start: start + n], greedy[start: start + n]
        start += n
        if np.isnan(lls).any():
            out[k] = np.nan
        elif example.metric == "greedy":
            out[k] = float(flags[0])
        elif example.metric == "acc_norm":  # lm-eval divides by len(choice), characters (bytes: acc_bytes)
            out[k] = float(np.argmax(lls / choice_lengths(example)) == example.label)
        else:
            out[k] = float(np.argmax(lls) == example.label)
    return out


def choice_lengths(example: Example) -> np.ndarray:
    """The length of each choice in characters, acc_norm's normaliser."""
    return np.array([len(c) for c in example.choices], dtype=float)


def evaluate(model, tokenizer, examples: list[Example], batch_size: int | None = None,
             progress: bool = False, encoded: list[Encoded] | None = None) -> np.ndarray:
    """Per-example correctness of the model as it is now (steering included)."""
    encoded = encoded or encode_examples(tokenizer, examples)
    logprob, greedy = loglikelihoods(model, tokenizer, encoded, batch_size, progress)
    return correctness(examples, logprob, greedy)


def summarize(examples: list[Example], correct: np.ndarray) -> dict:
    """Accuracy in percent: per task, and the mean over tasks. A task with non-finite logits has
    accuracy None (and so has the mean): those examples are broken, not wrong."""
    tasks = np.array([e.task for e in examples])
    per_task, non_finite = {}, {}
    for name in task_names(examples):
        values = correct[tasks == name]
        bad = int(np.isnan(values).sum())
        per_task[name] = None if bad else round(100.0 * float(values.mean()), 4)
        if bad:
            non_finite[name] = bad
    known = [v for v in per_task.values() if v is not None]
    accuracy = round(float(np.mean(known)), 4) if len(known) == len(per_task) else None
    return {"accuracy": accuracy, "per_task": per_task, "non_finite": non_finite}


def chance_correctness(examples: list[Example]) -> np.ndarray:
    """Each example's expected correctness under uniform guessing among its choices (0 for greedy
    generation); `summarize` turns it into chance accuracy per task and over tasks."""
    return np.array([0.0 if e.metric == "greedy" else 1.0 / len(e.choices) for e in examples])


def example_weights(examples: list[Example]) -> np.ndarray:
    """Weights that turn a per-example mean into the mean over tasks of per-task accuracy (percent)."""
    tasks = [e.task for e in examples]
    names = task_names(examples)
    counts = {t: tasks.count(t) for t in names}
    return np.array([100.0 / (len(names) * counts[t]) for t in tasks])
