"""The fast single-neuron sweep against the naive engine and the whole-request method, on the study's
six tasks' requests (`--data_dir`, by default ../shared/data/tasks_hf beside the repository) and a
model of mamba-130m's or mamba2-130m's shape (random weights, no download).

    python benchmarks/bench_sweep.py                    # 2 discovery docs of each task, 4 neurons, layer 20
    python benchmarks/bench_sweep.py --family mamba2    # mamba2-130m's shape (24 heads a layer)
    python benchmarks/bench_sweep.py --synthetic --docs 8

Three ways zero-ablate the same K neurons on the same requests: the whole-request method (the whole
model per neuron, every request read whole: what the original study and lm-eval do; on Mamba-2 in
the short chunks the project scans at, `mixer2.short_chunks`), the project's naive engine (the
whole model per neuron), and the fast engine (a prefix shared by every neuron, then the blocks after
layer L per neuron). The two engines read a context shared by several requests once or with every
request, per shape of group as measured faster (`delta_steering.reading`); a warm-up over every
request with one neuron makes those measurements before the timing starts, and says what they
chose. Each task runs on its own, and the mix is their sum (every task's requests, task after
task); the fast engine runs before and after the other two and its times are averaged, so that a
load that drifts (shared machines) weighs on all alike. Per neuron the cost is amortized: the fast
engine's prefix (layers 0..L, once per sweep) is separated from its per-neuron work. The projection
to the layer's N neurons on step 1's default discovery set (200 docs per task) follows how step 1
runs: one sweep, so one prefix, per chunk of 64 neurons (its default --chunk_neurons, the unit it
saves), i.e. (prefix x ceil(N / 64) + N x per-neuron) x 200 / docs.

The results must agree: greedy flags and per-neuron accuracies identical, log-probs within a
tolerance measured in the same run (10 x the largest of the naive engine's own relative differences
between batch size 1 and its default batch and between reading requests whole and sharing contexts,
first neuron, first document of each task, and the dtype's epsilon); the run exits 1 if not.
The last lines are `speedup vs whole-request: X` and `speedup vs naive: Y`, per neuron amortized,
on the mix.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from workload import add_arguments, by_task, describe, model_shaped, requests, timed

from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.engine.reading import choice_for
from delta_steering.analysis.metrics import correctness
from delta_steering.model.sites import num_delta_neurons
from delta_steering.engine.sweep import naive_loglikelihoods

STEP1_DOCS = 200  # step 1's default discovery documents per task
STEP1_CHUNK = 64  # step 1's default --chunk_neurons: one sweep (one prefix) per chunk
SAFETY = 10.0  # tolerance = SAFETY x the naive engine's own rounding (batch size, reading order)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, docs=2)
    parser.add_argument("--neurons", type=int, default=4, help="K neurons swept by each method")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=None, help="default: each engine's memory budget")
    parser.add_argument("--full_neurons", type=int, default=None,
                        help="neurons in the projected full sweep (default: the layer's delta neurons)")
    return parser.parse_args()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest log-prob difference relative to max(1, |b|)."""
    return float(np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(b)), initial=0.0))


def same_results(examples, a, b) -> bool:
    """Identical NaNs, greedy flags and per-neuron correctness of two sweeps (log-prob, greedy)."""
    (lp, greedy), (ref_lp, ref_greedy) = a, b
    return (np.array_equal(np.isnan(lp), np.isnan(ref_lp)) and np.array_equal(greedy, ref_greedy)
            and all(np.array_equal(correctness(examples, x, g), correctness(examples, y, h), equal_nan=True)
                    for x, g, y, h in zip(lp, greedy, ref_lp, ref_greedy)))


class Bench:
    """The three methods on one model, layer and set of neurons."""

    def __init__(self, model, tokenizer, layer: int, neurons: list[int], batch_size: int | None, device: str):
        self.model, self.tokenizer, self.layer, self.device = model, tokenizer, layer, device
        self.ablation, self.batch_size = Intervention.scale(neurons, 0.0), batch_size

    def fast(self, encoded, timings: dict | None = None, ablation=None):
        return fast_loglikelihoods(self.model, self.tokenizer, encoded, self.layer, ablation or self.ablation,
                                   self.batch_size, timings=timings)

    def naive(self, encoded, share_contexts: bool | None = None, batch_size: int | None = None, ablation=None):
        return naive_loglikelihoods(self.model, self.tokenizer, encoded, self.layer, ablation or self.ablation,
                                    batch_size or self.batch_size, share_contexts=share_contexts)

    def measure(self, encoded) -> dict:
        """Results and seconds of the three methods on some requests (fast: prefix and per-neuron)."""
        before, after = {}, {}
        fast, fast_first = timed(lambda: self.fast(encoded, before), self.device)
        whole, whole_s = timed(lambda: self.naive(encoded, share_contexts=False), self.device)
        naive, naive_s = timed(lambda: self.naive(encoded), self.device)
        _, fast_second = timed(lambda: self.fast(encoded, after), self.device)
        k = len(self.ablation.neurons)
        return {"fast": fast, "whole": whole, "naive": naive, "whole_per": whole_s / k, "naive_per": naive_s / k,
                "prefix_s": (before["prefix_s"] + after["prefix_s"]) / 2,
                "fast_per": (before["neurons_s"] + after["neurons_s"]) / 2 / k,
                "fast_all_in": (fast_first + fast_second) / 2 / k}


def combined(measured: list[tuple[list[int], dict]], n_requests: int) -> dict:
    """The mix: every task's requests, task after task (seconds summed, results side by side)."""
    out = {key: sum(m[key] for _, m in measured) for key in measured[0][1] if not isinstance(measured[0][1][key], tuple)}
    for method in ("fast", "whole", "naive"):
        lp = np.full((measured[0][1][method][0].shape[0], n_requests), np.nan)
        greedy = np.zeros(lp.shape, dtype=bool)
        for rows, m in measured:
            lp[:, rows], greedy[:, rows] = m[method]
        out[method] = (lp, greedy)
    return out


def report(name: str, examples, encoded, m: dict, tolerance: float) -> bool:
    """One line of seconds per neuron and speedups, one of agreement; whether the methods agree."""
    print(f"{name:15s} {describe(encoded)}")
    print(f"  s/neuron: whole-request {m['whole_per']:.3f}, naive {m['naive_per']:.3f}, fast {m['fast_per']:.3f} "
          f"(+ prefix {m['prefix_s']:.2f} s once; {m['fast_all_in']:.3f} all-in at this K); speedup per neuron "
          f"vs whole-request {m['whole_per'] / m['fast_per']:.2f}, vs naive {m['naive_per'] / m['fast_per']:.2f}")
    fast_naive, whole_naive = relative(m["fast"][0], m["naive"][0]), relative(m["whole"][0], m["naive"][0])
    same = same_results(examples, m["fast"], m["naive"]) and same_results(examples, m["whole"], m["naive"])
    ok = same and fast_naive <= tolerance and whole_naive <= tolerance
    print(f"  agreement: relative |d logprob| fast-naive {fast_naive:.1e}, whole-naive {whole_naive:.1e} "
          f"(tolerance {tolerance:.1e}); greedy flags and accuracies identical: {same}")
    return ok


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = model_shaped(args.family, getattr(torch, args.dtype), args.device, args.seed)
    tokenizer, examples, encoded = requests(args, model.config.vocab_size)
    n_neurons = num_delta_neurons(model)
    rng = np.random.default_rng(args.seed)
    neurons = sorted(rng.choice(n_neurons, min(args.neurons, n_neurons), replace=False).tolist())
    full = args.full_neurons or n_neurons
    bench = Bench(model, tokenizer, args.layer, neurons, args.batch_size, args.device)
    print(f"model: {args.family}-130m shape, random weights, {args.dtype} on {args.device} "
          f"({torch.get_num_threads()} CPU threads); layer {args.layer}; {len(neurons)} neurons; "
          f"{'synthetic requests' if args.synthetic else 'discovery requests'}, {args.docs} docs per task")

    tasks = by_task(examples)
    first = Intervention.scale(neurons[:1], 0.0)
    sample = [encoded[rows[i]] for chosen, rows in tasks.values() for i in range(len(chosen[0].requests))]
    bench.fast(encoded, ablation=first)  # warm-up: allocator, kernels, and each engine measures, once, which
    bench.naive(encoded, ablation=first)  # way reads each shape of context group faster (`reading`)
    for use in ("scoring", f"fast sweep from layer {args.layer}"):
        chosen = choice_for(model, use).shared
        print(f"{use}: {sum(chosen.values())} of {len(chosen)} shapes of context group read faster with their "
              "context once")
    reference = bench.naive(sample, ablation=first)[0]
    by_batch = relative(bench.naive(sample, batch_size=1, ablation=first)[0], reference)
    by_reading = relative(bench.naive(sample, share_contexts=False, ablation=first)[0],
                          bench.naive(sample, share_contexts=True, ablation=first)[0])
    eps = torch.finfo(getattr(torch, args.dtype)).eps
    tolerance = SAFETY * max(by_batch, by_reading, eps)
    print(f"tolerance: {tolerance:.1e} relative = {SAFETY:.0f} x the largest of the naive engine's own differences "
          f"between batch size 1 and its default batch ({by_batch:.1e}) and between reading requests whole and "
          f"sharing contexts ({by_reading:.1e}), first neuron, first document of each task, and {args.dtype}'s "
          f"epsilon ({eps:.1e})")

    ok, measured = True, []
    for name, (chosen, rows) in tasks.items():
        items = [encoded[i] for i in rows]
        measured.append((rows, bench.measure(items)))
        ok &= report(name, chosen, items, measured[-1][1], tolerance)
    mix = combined(measured, len(encoded))
    ok &= report("mix", examples, encoded, mix, tolerance)

    scale = STEP1_DOCS / args.docs
    projected = {"whole-request": mix["whole_per"] * full * scale, "naive": mix["naive_per"] * full * scale,
                 "fast": (mix["prefix_s"] * -(-full // STEP1_CHUNK) + mix["fast_per"] * full) * scale}
    print(f"projected {full} neurons x {STEP1_DOCS} docs per task (step 1's default, {-(-full // STEP1_CHUNK)} "
          f"chunks of up to {STEP1_CHUNK} neurons) on this machine: "
          + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in projected.items()))
    print(f"projected speedup (prefix included): vs whole-request {projected['whole-request'] / projected['fast']:.2f}, "
          f"vs naive {projected['naive'] / projected['fast']:.2f}")
    if not ok:
        sys.exit("the methods disagree")
    print(f"speedup vs whole-request: {mix['whole_per'] / mix['fast_per']:.2f}")
    print(f"speedup vs naive: {mix['naive_per'] / mix['fast_per']:.2f}")


if __name__ == "__main__":
    main()
