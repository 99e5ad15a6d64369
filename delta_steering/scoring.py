"""Log-likelihood scoring of continuations, as lm-evaluation-harness computes it, and accuracy.

Context and continuation are tokenised the lm-eval way (trailing spaces of the context move to the
continuation, the pair is encoded whole and split at the context's length, no special tokens, an
empty context is preceded by EOS). The LM head runs only where a continuation token is predicted.
acc is the argmax of summed log-prob, acc_norm of log-prob per character of the choice (lm-eval's
`len(choice)`), and a greedy example (lambada) is correct when every target token is the argmax.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import Encoded, gather_targets, pad_batch, request_batches, target_ids, target_mask, token_budget
from .sites import OutputHead
from .stats import bootstrap_indices, compare
from .tasks import Example, task_names


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


def target_scores(head: OutputHead, compact: torch.Tensor, encoded: list[Encoded]):
    """Summed log-prob (NaN where a logit is not finite) and all-greedy flag of each request's
    targets, from their final hidden states in the compact layout of `batching.gather_targets`."""
    mask = target_mask(encoded, compact.device)
    targets = target_ids(encoded, compact.device)
    logits = head(compact[mask]).float()
    token_logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    token_ok = torch.isfinite(logits).all(-1)
    token_greedy = (logits.argmax(-1) == targets) & token_ok
    owner = torch.arange(len(encoded), device=compact.device).repeat_interleave(mask.sum(1))

    def per_request(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(encoded), dtype=torch.float64, device=compact.device).index_add_(0, owner, values.double())

    finite = per_request((~token_ok).double()) == 0
    greedy = per_request((~token_greedy).double()) == 0
    logprob = torch.where(finite, per_request(token_logprob), torch.nan)
    return logprob.cpu().numpy(), greedy.cpu().numpy()


@torch.no_grad()
def loglikelihoods(model, tokenizer, encoded: list[Encoded], batch_size: int | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob (NaN where logits are not finite) and greedy flag of every request."""
    device = next(model.parameters()).device
    batches = request_batches(encoded, batch_size, token_budget(model, max(len(e.tokens) for e in encoded)))
    logprob = np.full(len(encoded), np.nan)
    greedy = np.zeros(len(encoded), dtype=bool)
    head = OutputHead(model)
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        items = [encoded[i] for i in batch]
        ids, lengths = pad_batch(items, tokenizer.pad_token_id or 0, device)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        logprob[batch], greedy[batch] = target_scores(head, gather_targets(hidden, items, lengths), items)
    return logprob, greedy


def choice_lengths(example: Example) -> np.ndarray:
    """The length of each choice in characters, acc_norm's normaliser."""
    return np.array([len(c) for c in example.choices], dtype=float)


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


class Comparison:
    """Configurations compared with a baseline on the same examples: accuracy, Δ or impact, paired
    bootstrap 95% CI and sign-test p, from `stats.compare` with bootstrap resamples drawn once."""

    def __init__(self, examples: list[Example], baseline: np.ndarray, seed: int):
        self.examples, self.baseline = examples, np.asarray(baseline, dtype=float)
        self.weights = example_weights(examples)
        self.indices = bootstrap_indices(np.array([e.task for e in examples]), seed=seed)
        self.base = summarize(examples, self.baseline)

    def _entry(self, correct: np.ndarray, first: np.ndarray, second: np.ndarray, key: str, fields: dict) -> dict:
        summary = summarize(self.examples, correct)
        result = compare(first, second, self.indices, self.weights)
        entry = {**fields, "accuracy": summary["accuracy"], key: result["delta"], "per_task": summary["per_task"],
                 "ci95": result["ci95"], "p_value": result["p_value"]}
        if summary["non_finite"]:
            entry["non_finite"] = summary["non_finite"]
        return entry

    def entry(self, correct: np.ndarray, **fields) -> dict:
        """A configuration: its accuracy and Δ = accuracy - baseline (points), CI of Δ, p."""
        return self._entry(correct, self.baseline, correct, "delta", fields)

    def impact(self, correct: np.ndarray, **fields) -> dict:
        """An ablation: its accuracy and impact = baseline - accuracy (points), CI of the impact, p."""
        return self._entry(correct, correct, self.baseline, "impact", fields)
