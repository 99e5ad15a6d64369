"""Greedy generation, the project's against lm-evaluation-harness's `HFLM.generate_until`: the same
IFEval prompts (`--ifeval_path`, by default ../shared/data/ifeval beside the repository), the same
model (mamba-130m's or mamba2-130m's shape, random weights, GPT-NeoX tokenizer, float32), one run.

    python benchmarks/bench_generation.py                      # 32 prompts, up to 1280 new tokens, batch size 8
    python benchmarks/bench_generation.py --family mamba2
    python benchmarks/bench_generation.py --prompts 16 --quick    # ours twice, lm-eval at --batch_size only

Responses of realistic length. A random model's greedy responses do not end on their own, so the
output head's EOS row (untied from the embeddings) is scaled until EOS is the greedy token at a
share 1 / (m + 1) of the steps, m being the mean length of the GPT-4 responses to IFEval in GPT-NeoX
tokens (302.6 on the 541 official responses). The scale is calibrated on the greedy steps of the
first 32 prompts (128 new tokens each, the EOS row zeroed): at step t with EOS row logit e_t and
largest other logit m_t, EOS wins at scale s when s e_t > m_t, so s is the quantile of m_t / e_t at
that share. Were the steps independent, lengths would be geometric with mean m, capped at
--max_new_tokens; the run prints how they came out (mean, median, longest, share capped). On the
default run (32 prompts, 1280 tokens) they came out as: Mamba-1 mean 411 tokens (median 191, longest
1280, 2 of 32 capped), Mamba-2 mean 245 (median 192, longest 876, none capped): varying as real
responses do.

Both sides read the same model and stop at EOS or --max_new_tokens, so both give the same texts.
Ours (`generation.generate_tokens`, continuous batching, the rows' cache passed explicitly) runs at
--batch_size rows four times, with `use_cache` in the model's config and generation config false
(as some Hub checkpoints say), true, then lm-eval's runs, then true, false: its time is the mean of
the four, and `use_cache false / true` compares the two of each, whose mean times a drift of the
machine's speed (or a first run's cost) cannot favour. lm-eval
runs at its default batch size 1 and at --batch_size (`generate_until` calls `model.generate` on
static batches, longest prompts first, with `use_cache=True`). The run then times ours at the batch
size it measures for itself, which step 3 uses by default. `--quick` (a run of half the time) runs
ours twice, use_cache true, before and after lm-eval, and lm-eval at --batch_size only: it prints
neither `use_cache false / true` nor the comparison at lm-eval's default batch size.

The projection of step 3's generation at its defaults (100 prompts, up to 1280 new tokens, the 9
configurations of `--both`: the baseline, 3 neuron sets ablated at the layer and the delta-sensitive
set amplified at 5 layers) simulates continuous batching with the step costs measured here (a step
of r rows, r a power of two up to the measured batch size, interpolated between) and the measured
prefill cost per prompt, over 200 draws of geometric lengths as above; the same simulation of this
run's own prompts is printed beside its measured time, to show how far to trust it. Perplexity (step
3's other cost) is not included.

The printout: each run's time and tokens per second; `identical: N/N`, the prompts whose responses
are equal in every run (when some are not, how many of each run's differ from lm-eval's at batch
size 1, one prompt at a time, and where they part, the gap between the two largest logits); `use_cache
false / true`; the projection; last `ratio: X` = lm-eval's time at --batch_size / ours at the same
batch size. The same greedy decoding in float32 parts where two logits are nearly tied: batched and
cached arithmetic moves a random model's logits by up to about 2e-3 after a hundred tokens (measured
on a prompt where model.generate alone and ours at batch size 8 parted, the uncached forward siding
with ours). A response that parts where the top two logits of an uncached float64 forward are more
than 1e-2 apart is a real difference: the run then exits 1 without a ratio.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import deque

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from workload import SHARED_DATA, load_tokenizer, model_shaped, timed

from delta_steering.engine import generation
from delta_steering.engine.batching import token_budget
from delta_steering.results_io import read_jsonl

LM_EVAL_DEFAULT_BATCH = 1
CALIBRATION_PROMPTS, CALIBRATION_TOKENS = 32, 128
STEP3_PROMPTS, STEP3_MAX_NEW_TOKENS = 100, 1280  # step 3's --num_samples and --max_new_tokens defaults
STEP3_BOTH = 9  # --both: baseline, 3 sets ablated at the layer, the delta-sensitive set amplified at 5 layers
DRAWS = 200  # simulated draws of response lengths for the projection
NEAR_TIE = 1e-2  # a top-2 logit gap below this, in float64, is within what float32 batching moves


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mamba", choices=["mamba", "mamba2"],
                        help="mamba: mamba-130m's shape; mamba2: mamba2-130m's shape")
    parser.add_argument("--prompts", type=int, default=32, help="the first N IFEval prompts")
    parser.add_argument("--max_new_tokens", type=int, default=STEP3_MAX_NEW_TOKENS)
    parser.add_argument("--batch_size", type=int, default=8, help="B: rows per step, ours and lm-eval's")
    parser.add_argument("--ifeval_path", default=str(SHARED_DATA / "ifeval" / "input_data.jsonl"))
    parser.add_argument("--responses_path",
                        default=str(SHARED_DATA / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl"),
                        help="GPT-4's IFEval responses: their mean length sets the responses' mean")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the random model's weights")
    parser.add_argument("--quick", action="store_true",
                        help="ours twice (use_cache true) and lm-eval at --batch_size only (see above)")
    return parser.parse_args()


def mean_tokens(tokenizer, path: str) -> float:
    """The mean length of the GPT-4 responses, in the tokenizer's tokens."""
    return float(np.mean([len(tokenizer(row["response"], add_special_tokens=False).input_ids)
                          for row in read_jsonl(path, "IFEval response file")]))


@torch.no_grad()
def calibrate_eos(model, tokenizer, prompts: list[str], mean: float) -> float:
    """Scale the output head's EOS row (untied from the embeddings first) so that EOS is the greedy
    token at a share 1 / (mean + 1) of the calibration prompts' greedy steps; returns the scale."""
    eos = tokenizer.eos_token_id
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    row = model.lm_head.weight[eos].clone()
    model.lm_head.weight[eos] = 0
    steps = []

    def record(_module, inputs, logits):
        others = logits.reshape(-1, logits.shape[-1]).clone()
        others[:, eos] = -torch.inf
        steps.append((inputs[0].reshape(-1, row.numel()) @ row, others.max(-1).values))

    hook = model.lm_head.register_forward_hook(record)
    try:
        generation.generate_tokens(model, tokenizer, prompts, CALIBRATION_TOKENS, batch_size=len(prompts))
    finally:
        hook.remove()
    eos_logit, best_other = (torch.cat(t).numpy() for t in zip(*steps))
    wins_above = np.where(eos_logit > 0, best_other / np.where(eos_logit > 0, eos_logit, 1.0), np.inf)
    scale = float(np.quantile(wins_above, 1 / (mean + 1)))
    model.lm_head.weight[eos] = row * scale
    return scale


def lm_eval_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              max_length=max_new_tokens + 2048)
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(p, {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False}))
                for p in prompts]
    return lm.generate_until(requests, disable_tqdm=True)


def ours(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None,
         use_cache: bool) -> list[list[int]]:
    model.config.use_cache = model.generation_config.use_cache = use_cache
    return generation.generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)


@torch.no_grad()
def parting_gaps(model, tokenizer, prompts: list[str], tokens: list[list[int]], texts: dict[str, list[str]]
                 ) -> dict[int, float]:
    """For each prompt whose runs' texts differ: the gap between the two largest logits, in an uncached
    float64 forward, at the first token of `tokens` (one run's) whose text some run does not share."""
    wide = copy.deepcopy(model).double()
    gaps = {}
    for i, prompt in enumerate(prompts):
        others = {run[i] for run in texts.values()}
        if len(others) == 1:
            continue
        k = next((k for k in range(len(tokens[i]))
                  if not all(text.startswith(tokenizer.decode(tokens[i][:k + 1], skip_special_tokens=True))
                             for text in others)), len(tokens[i]))
        ids = tokenizer(prompt, add_special_tokens=False).input_ids + tokens[i][:k]
        top = wide(input_ids=torch.tensor([ids])).logits[0, -1].topk(2).values
        gaps[i] = float(top[0] - top[1])
    return gaps


def decode_steps(lengths, cap: int) -> list[int]:
    """One-token steps each response takes after its prefill: its tokens, and the EOS unless capped,
    less the first token (from the prefill)."""
    return [n if n < cap else cap - 1 for n in lengths]


def simulated_seconds(steps: list[int], rows: int, costs: dict[int, float], prefill_s: float) -> float:
    """Continuous batching of prompts needing these steps, in this order, on `rows` rows: each
    prompt's prefill, then every step at the measured cost of its live rows."""
    sizes, seconds = list(costs), list(costs.values())
    waiting, live, total = deque(steps), [], prefill_s * len(steps)
    while True:
        while waiting and len(live) < rows:
            n = waiting.popleft()
            if n:
                live.append(n)
        if not live:
            return total
        total += float(np.interp(len(live), sizes, seconds))
        live = [n - 1 for n in live if n > 1]


def step_costs(model, most: int) -> dict[int, float]:
    """Seconds of a step of r rows, r = 1, 2, 4, ... and `most`."""
    sizes = sorted({most} | {2 ** k for k in range(most.bit_length()) if 2 ** k <= most})
    return {rows: generation.step_seconds(model, rows) for rows in sizes}


def prefill_seconds(model, tokenizer, prompts: list[str], rows: int) -> float:
    """Seconds per prompt of reading prompts as continuous batching on `rows` rows reads them
    (`generation.next_prefill`: shortest first, padding bounded)."""
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    queue = deque(sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    budget = token_budget(model, max(len(e) for e in encoded))
    chunks = []
    while queue:
        chunks.append([encoded[i] for i in generation.next_prefill(queue, encoded, rows, budget)])
    _, seconds = timed(lambda: [generation.prefill(model, chunk, tokenizer.pad_token_id) for chunk in chunks], "cpu")
    return seconds / len(prompts)


def describe_lengths(lengths: list[int], cap: int) -> str:
    return (f"mean {np.mean(lengths):.0f} tokens, median {np.median(lengths):.0f}, longest {max(lengths)}, "
            f"{sum(n >= cap for n in lengths)} of {len(lengths)} capped at {cap}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    model = model_shaped(args.family, torch.float32, args.device, args.seed)
    rows = [row["prompt"] for row in read_jsonl(args.ifeval_path, "IFEval prompts")]
    prompts = rows[:args.prompts]
    mean = mean_tokens(tokenizer, args.responses_path)
    scale = calibrate_eos(model, tokenizer, rows[:CALIBRATION_PROMPTS], mean)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    print(f"model: {args.family}-130m shape, random weights, float32 on {args.device} ({torch.get_num_threads()} "
          f"CPU threads); {len(prompts)} IFEval prompts of {min(lengths)}-{max(lengths)} tokens, up to "
          f"{args.max_new_tokens} new tokens; EOS row scaled x{scale:.3g} for a mean response of {mean:.1f} "
          f"tokens (the GPT-4 responses')")

    B = args.batch_size
    theirs_sizes = (B,) if args.quick else (B, LM_EVAL_DEFAULT_BATCH)
    for b in theirs_sizes:  # warm-up on every prompt: allocator, lazy imports, the shapes prefilled
        generation.generate_tokens(model, tokenizer, prompts, 2, batch_size=b)
        lm_eval_texts(model, tokenizer, prompts, 2, b)

    def run_ours(use_cache: bool) -> tuple[list[list[int]], float]:
        return timed(lambda: ours(model, tokenizer, prompts, args.max_new_tokens, B, use_cache), args.device)

    flags = (True, True) if args.quick else (False, True, True, False)  # drift cancels in both means
    before = [run_ours(flag) for flag in flags[:len(flags) // 2]]
    theirs = {b: timed(lambda b=b: lm_eval_texts(model, tokenizer, prompts, args.max_new_tokens, b), args.device)
              for b in theirs_sizes}
    after = [run_ours(flag) for flag in flags[len(flags) // 2:]]
    measured_rows = min(generation.batch_size_for(model), len(prompts))
    own, own_s = timed(lambda: ours(model, tokenizer, prompts, args.max_new_tokens, None, True), args.device)

    runs = before + after
    false_s, true_s = [[s for (_, s), flag in zip(runs, flags) if flag == want] for want in (False, True)]
    produced = [len(ids) for ids in runs[0][0]]
    tokens = sum(produced)
    ours_s = float(np.mean([s for _, s in runs]))
    print(f"responses: {describe_lengths(produced, args.max_new_tokens)}")
    order = ", ".join(str(flag).lower() for flag in flags[:len(flags) // 2]) + ", lm-eval, " + ", ".join(
        str(flag).lower() for flag in flags[len(flags) // 2:])
    print(f"ours at batch size {B}: {ours_s:.1f} s, {tokens / ours_s:.1f} tokens/s (continuous batching; the mean of "
          f"{len(runs)} runs in the order {order} of use_cache in the config: "
          + ", ".join(f"{s:.1f} s" for _, s in runs) + ")")
    print(f"ours at its measured batch size {measured_rows}: {own_s:.1f} s, {tokens / own_s:.1f} tokens/s")
    for b, (_, seconds) in theirs.items():
        print(f"lm-eval HFLM.generate_until at batch size {b}{' (its default)' if b == LM_EVAL_DEFAULT_BATCH else ''}: "
              f"{seconds:.1f} s, {tokens / seconds:.1f} tokens/s; "
              f"ours at batch size {B} is {seconds / ours_s:.2f}x faster")

    named = {f"ours at batch size {B} (run {k + 1})": run for k, (run, _) in enumerate(runs)}
    named[f"ours at batch size {measured_rows}"] = own
    texts = {name: [tokenizer.decode(ids, skip_special_tokens=True) for ids in run] for name, run in named.items()}
    texts |= {f"lm-eval at batch size {b}": t for b, (t, _) in theirs.items()}
    same = sum(len({run[i] for run in texts.values()}) == 1 for i in range(len(prompts)))
    print(f"identical: {same}/{len(prompts)}")
    gaps = parting_gaps(model, tokenizer, prompts, runs[0][0], texts)
    ties = sum(gap < NEAR_TIE for gap in gaps.values())
    if gaps:
        print(f"where responses part, the top two logits (float64, uncached) are {NEAR_TIE} or less apart for {ties} "
              f"of {len(gaps)}: " + ", ".join(f"prompt {i} {gap:.1e}" for i, gap in gaps.items()))
    if same < len(prompts):  # against lm-eval's smallest batches: one prompt at a time unless --quick
        name = f"lm-eval at batch size {min(theirs)}"
        reference = texts[name]
        print(f"differing from {name}, prompt by prompt: " + ", ".join(
            f"{other} {sum(a != b for a, b in zip(run, reference))}" for other, run in texts.items()))
    if false_s:
        print(f"use_cache false / true: {sum(false_s) / sum(true_s):.2f}")

    step3_rows = min(generation.batch_size_for(model), STEP3_PROMPTS)
    costs = step_costs(model, max(step3_rows, B, measured_rows))
    per_prompt = prefill_seconds(model, tokenizer, rows[:STEP3_PROMPTS], step3_rows)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    check = simulated_seconds(decode_steps([produced[i] for i in order], args.max_new_tokens), B, costs,
                              prefill_seconds(model, tokenizer, prompts, B))  # read as the run reads them
    rng = np.random.default_rng(0)
    draws = [simulated_seconds(decode_steps(np.minimum(rng.geometric(1 / (mean + 1), STEP3_PROMPTS) - 1,
                                                       STEP3_MAX_NEW_TOKENS), STEP3_MAX_NEW_TOKENS),
                               step3_rows, costs, per_prompt) for _ in range(DRAWS)]
    longest = simulated_seconds([STEP3_MAX_NEW_TOKENS - 1] * STEP3_PROMPTS, step3_rows, costs, per_prompt)
    print("step costs measured: " + ", ".join(f"{r} rows {s * 1000:.0f} ms" for r, s in costs.items())
          + f"; prefill {per_prompt * 1000:.0f} ms a prompt in batches of {step3_rows}; this run's ours at batch "
          f"size {B} simulated {check:.1f} s against {ours_s:.1f} s measured")
    print(f"projected default step 3 generation on this CPU ({STEP3_BOTH} configurations of --both x "
          f"{STEP3_PROMPTS} prompts, up to {STEP3_MAX_NEW_TOKENS} new tokens, {step3_rows} rows): "
          f"{STEP3_BOTH * np.mean(draws) / 3600:.2f} h with lengths like GPT-4's (mean {mean:.0f} tokens), "
          f"{STEP3_BOTH * longest / 3600:.2f} h if every response runs to {STEP3_MAX_NEW_TOKENS} tokens")
    if ties < len(gaps):
        sys.exit(f"{len(gaps) - ties} responses differ where no two logits are near a tie")
    print(f"ratio: {theirs[B][1] / ours_s:.2f}")


if __name__ == "__main__":
    main()
