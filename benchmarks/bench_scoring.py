"""The project's log-likelihood scoring against lm-evaluation-harness's `HFLM.loglikelihood`: the same
requests of the study's six tasks (`--data_dir`, by default ../shared/data/tasks_hf beside the
repository), the same model (mamba-130m's or mamba2-130m's shape, random weights, no download), one run.

    python benchmarks/bench_scoring.py                      # 6 discovery docs of each task, batch size 8
    python benchmarks/bench_scoring.py --family mamba2
    python benchmarks/bench_scoring.py --contexts whole     # ours reading every request whole

The requests are those of the first N discovery documents of each task, built by the project
(`tasks.load_examples`, `scoring.encode_examples`); lm-eval gets the same (context, continuation)
pairs as `Instance`s, and the run first checks that it tokenises them to the same ids. Ours runs at
`--batch_size` B; lm-eval at its default batch size 1 and at B. Each task runs on its own, and the
mix is their sum (every task's requests, task after task); ours runs before and after lm-eval and its two times are
averaged, so that a load that drifts (shared machines) weighs on both alike. The results must agree
(summed log-probs within 1e-4 relative, greedy flags and per-example correctness identical), else
the run exits 1. The last line is `ratio: X` = lm-eval's time at batch size B / ours, on the mix.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from workload import add_arguments, by_task, describe, model_shaped, requests, timed

from delta_steering.engine.batching import Encoded
from delta_steering.engine.reading import choice_for
from delta_steering.analysis.metrics import correctness
from delta_steering.engine.scoring import loglikelihoods, shares_contexts
from delta_steering.data.tasks import Example

Scores = tuple[np.ndarray, np.ndarray]  # summed log-prob and greedy flag of each request
CONTEXTS = {"default": None, "shared": True, "whole": False}  # loglikelihoods' share_contexts
READING = {None: "once or whole, as measured faster per shape", True: "once"}
TOLERANCE = 1e-4  # relative, on summed log-probs: fp32 rounding differs with batch shapes
LM_EVAL_DEFAULT_BATCH = 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, docs=6)
    parser.add_argument("--batch_size", type=int, default=8, help="B: requests per forward, ours and lm-eval's")
    parser.add_argument("--contexts", default="default", choices=list(CONTEXTS),
                        help="ours: read a context shared by several requests once (shared), every request "
                             "whole (whole), or per shape of group the way measured faster (default)")
    args = parser.parse_args()
    if args.synthetic:
        parser.error("lm-eval needs text: --synthetic is bench_sweep.py's")
    return args


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


class Bench:
    """Ours and lm-eval's (at its default batch size and at ours) on one model."""

    def __init__(self, model, tokenizer, encoded: list[Encoded], requests: list[Instance], args):
        self.model, self.tokenizer, self.encoded, self.requests = model, tokenizer, encoded, requests
        self.batch_size, self.share, self.device = args.batch_size, CONTEXTS[args.contexts], args.device
        self.lms = {b: HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=b, max_length=2048)
                    for b in dict.fromkeys((LM_EVAL_DEFAULT_BATCH, args.batch_size))}

    def ours(self, rows: list[int]) -> Scores:
        return loglikelihoods(self.model, self.tokenizer, [self.encoded[i] for i in rows], self.batch_size,
                              share_contexts=self.share)

    def theirs(self, rows: list[int], batch_size: int) -> Scores:
        scores = self.lms[batch_size].loglikelihood([self.requests[i] for i in rows], disable_tqdm=True)
        return np.array([s for s, _ in scores]), np.array([g for _, g in scores])

    def measure(self, rows: list[int]) -> dict:
        """Scores and seconds of ours (averaged over a run before and one after lm-eval's) and lm-eval's."""
        ours, before = timed(lambda: self.ours(rows), self.device)
        theirs = {b: timed(lambda: self.theirs(rows, b), self.device) for b in self.lms}
        _, after = timed(lambda: self.ours(rows), self.device)
        return {"ours": ours, "ours_s": (before + after) / 2, "theirs": theirs}


def combined(measured: list[tuple[list[int], dict]], n_requests: int) -> dict:
    """The mix: every task's requests, task after task (seconds summed, scores side by side)."""
    def scores(pieces) -> Scores:
        lp, greedy = np.full(n_requests, np.nan), np.zeros(n_requests, dtype=bool)
        for rows, (values, flags) in pieces:
            lp[rows], greedy[rows] = values, flags
        return lp, greedy

    theirs = {b: (scores([(rows, m["theirs"][b][0]) for rows, m in measured]),
                  sum(m["theirs"][b][1] for _, m in measured)) for b in measured[0][1]["theirs"]}
    return {"ours": scores([(rows, m["ours"]) for rows, m in measured]),
            "ours_s": sum(m["ours_s"] for _, m in measured), "theirs": theirs}


def report(name: str, examples: list[Example], encoded: list[Encoded], m: dict, batch_size: int) -> tuple[bool, float]:
    """A line of times and ratios, one of agreement; whether they agree, and the ratio at equal batch size."""
    default = m["theirs"][LM_EVAL_DEFAULT_BATCH][1]
    equal = m["theirs"][batch_size][1]
    print(f"{name:15s} {describe(encoded)}")
    print(f"  ours {m['ours_s']:.2f} s; lm-eval {default:.2f} s at batch size {LM_EVAL_DEFAULT_BATCH} (its default), "
          f"{equal:.2f} s at {batch_size}; ratio {default / m['ours_s']:.2f} at its default, "
          f"{equal / m['ours_s']:.2f} at equal batch size")
    ok = True
    for b, (scores, _) in m["theirs"].items():
        relative, same = difference(examples, m["ours"], scores)
        print(f"  agreement with lm-eval at batch size {b}: max relative |d logprob| {relative:.1e} "
              f"(tolerance {TOLERANCE:.0e}), greedy flags and correctness identical: {same}")
        ok &= relative <= TOLERANCE and same
    return ok, equal / m["ours_s"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = model_shaped(args.family, torch.float32, args.device, args.seed)
    tokenizer, examples, encoded = requests(args, model.config.vocab_size)
    bench = Bench(model, tokenizer, encoded, instances(examples), args)
    if not same_tokens(bench.lms[LM_EVAL_DEFAULT_BATCH], bench.requests, encoded):
        sys.exit("lm-eval tokenises the requests differently")
    print(f"model: {args.family}-130m shape, random weights, float32 on {args.device} ({torch.get_num_threads()} "
          f"CPU threads); {args.docs} discovery docs per task; ours at batch size {args.batch_size} reads shared "
          f"contexts {READING[bench.share] if shares_contexts(model, bench.share) else 'with every request'} "
          f"(--contexts {args.contexts})")

    tasks = by_task(examples)
    warm = [rows[i] for _, rows in tasks.values() for i in range(min(4, len(rows)))]
    [bench.theirs(warm, b) for b in bench.lms]  # warm-up: allocator, kernels, lazy imports
    for _, rows in tasks.values():  # ours also measures, once, which way reads each shape of group faster
        bench.ours(rows)
    if bench.share is None and shares_contexts(model, None):
        chosen = choice_for(model, "scoring").shared
        print(f"measured in the warm-up: {sum(chosen.values())} of {len(chosen)} shapes of group read faster with "
              "their context once")
    ok, measured = True, []
    for name, (chosen, rows) in tasks.items():
        measured.append((rows, bench.measure(rows)))
        ok &= report(name, chosen, [encoded[i] for i in rows], measured[-1][1], args.batch_size)[0]
    agree, ratio = report("mix", examples, encoded, combined(measured, len(encoded)), args.batch_size)
    if not (ok and agree):
        sys.exit("the scorers disagree")
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
