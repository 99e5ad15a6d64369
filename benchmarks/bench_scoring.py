"""The project's log-likelihood scoring against lm-evaluation-harness's `HFLM.loglikelihood`: the same
requests, the same model (mamba-130m's or mamba2-130m's shape, random weights, no download), one run.

    python benchmarks/bench_scoring.py                                  # 10 documents of each of the six tasks
    python benchmarks/bench_scoring.py --tasks hellaswag arc_easy piqa  # the three multiple-choice ones
    python benchmarks/bench_scoring.py --family mamba2 --contexts shared   # Mamba-2 reads them whole by default

The requests are those of the first N discovery documents of each task, built by the project
(`tasks.load_examples`, `scoring.encode_examples`); lm-eval gets the same (context, continuation)
pairs as `Instance`s, and the run first checks that it tokenises them to the same ids. Both score
every request; the run checks that they agree (summed log-probs within 1e-4 relative, greedy flags
and per-example correctness identical) and exits non-zero if not. It prints each one's time and
last a line `ratio: X.XX` = lm-eval's time / ours. Ours runs before and after lm-eval and its two
times are averaged, so that a load that drifts during the run (shared machines) weighs on both alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from bench_sweep import model_130m_shaped, timed
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from delta_steering.batching import Encoded
from delta_steering.scoring import correctness, encode_examples, loglikelihoods, shares_contexts
from delta_steering.tasks import Example, load_examples

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")  # the study's six
Scores = tuple[np.ndarray, np.ndarray]  # summed log-prob and greedy flag of each request
CONTEXTS = {"default": None, "shared": True, "whole": False}  # loglikelihoods' share_contexts
TOLERANCE = 1e-4  # relative, on summed log-probs: fp32 rounding differs with batch shapes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10, help="discovery documents per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--data_dir", default=str(SHARED_DATA / "tasks_hf"), help="DIR/<task>/<split>.jsonl")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                        help="a tokenizer.json file, or a tokenizer directory or Hub name (the GPT-NeoX-20B one)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="requests per forward for both (default: ours its memory budget, lm-eval its default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the random model's weights")
    parser.add_argument("--family", default="mamba", choices=["mamba", "mamba2"], help="the 130m model's family")
    parser.add_argument("--contexts", default="default", choices=list(CONTEXTS),
                        help="ours: read a context shared by several requests once (shared), every request "
                             "whole (whole), or as scoring decides for the model and device (default)")
    return parser.parse_args()


def load_tokenizer(name: str):
    """The tokenizer, with <|endoftext|> as EOS and pad when it is a bare tokenizer.json."""
    if name.endswith(".json"):
        if not Path(name).is_file():
            sys.exit(f"no tokenizer at {name}: pass --tokenizer (the GPT-NeoX-20B tokenizer.json, directory or name)")
        return PreTrainedTokenizerFast(tokenizer_file=name, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    return AutoTokenizer.from_pretrained(name)


def instances(examples: list[Example]) -> list[Instance]:
    """lm-eval's loglikelihood requests: every example's (context, continuation) pairs, in order."""
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=choice,
                     metadata=(example.task, example.doc_id, 1))
            for example in examples for choice, pair in enumerate(example.requests)]


def same_tokens(lm: HFLM, requests: list[Instance], encoded: list[Encoded]) -> bool:
    """Whether lm-eval encodes every pair to our token ids, split at the same place (no task here
    has an empty context, which lm-eval and we prefix alike with EOS)."""
    for request, e in zip(requests, encoded):
        context, continuation = lm._encode_pair(*request.args)
        if tuple(context + continuation) != e.tokens or len(continuation) != e.n_target:
            return False
    return True


def difference(examples: list[Example], ours: Scores, theirs: Scores) -> tuple[float, bool]:
    """Largest relative log-prob difference, and whether NaNs, greedy flags and correctness agree."""
    (lp, greedy), (ref_lp, ref_greedy) = ours, theirs
    relative = float(np.nanmax(np.abs(lp - ref_lp) / np.maximum(1.0, np.abs(ref_lp)), initial=0.0))
    same = (np.array_equal(np.isnan(lp), np.isnan(ref_lp)) and np.array_equal(greedy, ref_greedy)
            and np.array_equal(correctness(examples, lp, greedy), correctness(examples, ref_lp, ref_greedy),
                               equal_nan=True))
    return relative, same


def first_of_each_task(examples: list[Example]) -> list[int]:
    """The requests of each task's first example: a warm-up that takes every code path."""
    firsts, start = {}, 0
    for example in examples:
        if example.task not in firsts:
            firsts[example.task] = range(start, start + len(example.requests))
        start += len(example.requests)
    return [i for r in firsts.values() for i in r]


def report_agreement(examples: list[Example], ours: Scores, theirs: Scores) -> bool:
    """Print the agreement of each task; whether every task agrees within TOLERANCE."""
    ok = True
    tasks = np.array([e.task for e in examples for _ in e.requests])
    for name in dict.fromkeys(tasks):
        rows = tasks == name
        chosen = [e for e in examples if e.task == name]
        relative, same = difference(chosen, (ours[0][rows], ours[1][rows]), (theirs[0][rows], theirs[1][rows]))
        print(f"  {name:15s} {rows.sum():4d} requests: max relative |d logprob| {relative:.1e}, "
              f"greedy flags and correctness identical: {same}")
        ok &= relative <= TOLERANCE and same
    return ok


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    model = model_130m_shaped(args.family, torch.float32, args.device, args.seed)
    examples = load_examples(args.tasks, args.data_dir, "discovery", args.docs)
    encoded = encode_examples(tokenizer, examples)
    requests = instances(examples)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.batch_size or 1,
              max_length=2048)
    if not same_tokens(lm, requests, encoded):
        sys.exit("lm-eval tokenises the requests differently")
    share = CONTEXTS[args.contexts]
    lengths = [len(e.tokens) for e in encoded]
    print(f"model: {args.family}-130m shape, random weights, float32 on {args.device} ({torch.get_num_threads()} CPU threads); "
          f"{len(examples)} documents of {', '.join(args.tasks)}: {len(encoded)} requests of {min(lengths)}-"
          f"{max(lengths)} tokens (mean {np.mean(lengths):.0f}); batch size: "
          f"{args.batch_size or 'ours its memory budget, lm-eval 1'}; ours reads shared contexts "
          f"{'once' if shares_contexts(model, share) else 'with every request'} (--contexts {args.contexts})")

    def ours(chosen: list[int]):
        return loglikelihoods(model, tokenizer, [encoded[i] for i in chosen], args.batch_size, share_contexts=share)

    def theirs(chosen: list[int]):
        scores = lm.loglikelihood([requests[i] for i in chosen], disable_tqdm=True)
        return np.array([s for s, _ in scores]), np.array([g for _, g in scores])

    warm, every = first_of_each_task(examples), list(range(len(encoded)))
    ours(warm), theirs(warm)  # warm-up: allocator, kernels, lazy imports
    # ours runs before and after lm-eval and its times are averaged, so that a load that drifts
    # during the run (shared machines) weighs on both alike
    first, ours_before = timed(lambda: ours(every), args.device)
    reference, theirs_s = timed(lambda: theirs(every), args.device)
    second, ours_after = timed(lambda: ours(every), args.device)
    ours_s = (ours_before + ours_after) / 2
    print(f"ours: {ours_before:.2f} s before, {ours_after:.2f} s after lm-eval")
    ok = report_agreement(examples, first, reference)
    print(f"agreement: {'yes' if ok else 'NO'} (tolerance {TOLERANCE:.0e} relative); ours run to run: "
          f"{difference(examples, second, first)[0]:.1e}")
    if not ok:
        sys.exit("the scorers disagree")
    print(f"lm-eval: {theirs_s:8.2f} s")
    print(f"ours:    {ours_s:8.2f} s")
    print(f"ratio: {theirs_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
