"""Naive vs fast single-neuron sweep on a model of mamba-130m's or mamba2-130m's shape (random weights,
no download).

    python benchmarks/bench_sweep.py                      # 16 neurons x 32 sequences, layer 20, CPU
    python benchmarks/bench_sweep.py --device cuda --neurons 64
    python benchmarks/bench_sweep.py --family mamba2 --neurons 4   # mamba2-130m's shape (24 heads)

Both engines zero-ablate the same K neurons on the same E multiple-choice sequences (64-128 tokens,
a 2-8 token continuation scored). The run checks that they agree (log-probs, greedy flags, per-neuron
accuracies), prints seconds per neuron and the projected time for all N neurons of the layer (1536
channels of mamba-130m, 24 heads of mamba2-130m), and last a line `speedup: X.XX` = projected naive /
projected fast full sweep. The fast engine's shared prefix (layers 0..L, once per example batch) is
paid once per sweep, so its projection is prefix + N x per-neuron.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from delta_steering.batching import Encoded
from delta_steering.fast_sweep import fast_loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.scoring import correctness
from delta_steering.sites import num_delta_neurons
from delta_steering.sweep import sweep_loglikelihoods
from delta_steering.tasks import Example

CHOICES = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mamba", choices=["mamba", "mamba2"],
                        help="mamba: mamba-130m's shape; mamba2: mamba2-130m's shape (24 heads a layer)")
    parser.add_argument("--neurons", type=int, default=16, help="K neurons swept by both engines")
    parser.add_argument("--examples", type=int, default=32, help="E scored sequences (4 choices per example)")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=None, help="default: each engine's memory budget")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--full_neurons", type=int, default=None,
                        help="neurons in the projected full sweep (default: the layer's delta neurons)")
    parser.add_argument("--no_shared_contexts", action="store_true",
                        help="fast engine without running each example's shared context once per neuron")
    return parser.parse_args()


def model_130m_shaped(family: str, dtype: torch.dtype, device: str, seed: int):
    """Random-weight MambaForCausalLM with mamba-130m's configuration, or Mamba2ForCausalLM with
    mamba2-130m's (hidden 768, 24 layers, 24 heads of 64, state 128, one group)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, expand=2, conv_kernel=4, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0, use_cache=False)
    if family == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(state_size=128, head_dim=64, num_heads=24, n_groups=1, chunk_size=256,
                                               **common))
    else:
        model = MambaForCausalLM(MambaConfig(state_size=16, **common))
    return model.to(device=device, dtype=dtype).eval()


def random_requests(n_sequences: int, vocab: int, seed: int) -> tuple[list[Example], list[Encoded]]:
    """Multiple-choice examples of 4 choices: a shared random context, random 2-8 token choices,
    64-128 tokens in all."""
    rng = np.random.default_rng(seed)
    examples, encoded = [], []
    for doc in range(-(-n_sequences // CHOICES)):
        n = min(CHOICES, n_sequences - doc * CHOICES)
        context = rng.integers(1, vocab, rng.integers(56, 121)).tolist()
        for _ in range(n):
            choice = rng.integers(1, vocab, rng.integers(2, 9)).tolist()
            encoded.append(Encoded(tuple(context + choice), len(choice)))
        requests = tuple((f"doc {doc}", f" choice {c}") for c in range(n))
        examples.append(Example("random", doc, requests, tuple(f"choice {c}" for c in range(n)),
                                int(rng.integers(n)), "acc"))
    return examples, encoded


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = model_130m_shaped(args.family, dtype, args.device, args.seed)
    tokenizer = SimpleNamespace(pad_token_id=0)
    examples, encoded = random_requests(args.examples, model.config.vocab_size, args.seed)
    rng = np.random.default_rng(args.seed)
    n_neurons = num_delta_neurons(model)
    neurons = sorted(rng.choice(n_neurons, min(args.neurons, n_neurons), replace=False).tolist())
    full = args.full_neurons or n_neurons
    lengths = [len(e.tokens) for e in encoded]
    print(f"model: {args.family}-130m shape, random weights, {args.dtype} on {args.device} "
          f"({torch.get_num_threads()} CPU threads); layer {args.layer}; {len(neurons)} neurons x "
          f"{len(encoded)} sequences ({min(lengths)}-{max(lengths)} tokens, {len(examples)} examples of "
          f"{CHOICES} choices); fast engine {'without' if args.no_shared_contexts else 'with'} shared contexts")

    def run(engine: str, ids: list[int], timings: dict | None = None):
        ablation = Intervention.scale(ids, 0.0)
        if engine == "fast":
            return fast_loglikelihoods(model, tokenizer, encoded, args.layer, ablation, args.batch_size,
                                       timings=timings, share_contexts=not args.no_shared_contexts)
        return sweep_loglikelihoods(model, tokenizer, encoded, args.layer, ablation, "naive", args.batch_size)

    run("fast", neurons[:1])  # warm-up: allocator, kernels
    # the fast engine runs before and after the naive one and its times are averaged, so that a load
    # that drifts during the run (shared machines) weighs on both engines alike
    before, after = {}, {}
    (fast_lp, fast_greedy), fast_first = timed(lambda: run("fast", neurons, before), args.device)
    (naive_lp, naive_greedy), naive_s = timed(lambda: run("naive", neurons), args.device)
    _, fast_second = timed(lambda: run("fast", neurons, after), args.device)
    fast_s = (fast_first + fast_second) / 2
    timings = {key: (before[key] + after[key]) / 2 for key in before}
    print(f"fast engine runs: {fast_first:.2f} s before, {fast_second:.2f} s after the naive one")

    error = np.abs(fast_lp - naive_lp)
    diff = float(np.nanmax(error))
    relative = float(np.nanmax(error / np.maximum(1.0, np.abs(naive_lp))))
    same_nan = bool((np.isnan(fast_lp) == np.isnan(naive_lp)).all())
    same_greedy = bool((fast_greedy == naive_greedy).all())
    same_acc = all(np.array_equal(correctness(examples, a, g), correctness(examples, b, h), equal_nan=True)
                   for a, g, b, h in zip(naive_lp, naive_greedy, fast_lp, fast_greedy))
    # float rounding differs with batch shapes: on this random model (residual stream ~1e3) the naive
    # engine's own summed log-probs (~-100) move by ~1e-5 relative between batch sizes 1 and default
    tolerance = 3e-5 if dtype == torch.float32 else 2e-2
    print(f"agreement: max |d logprob| {diff:.2e} (relative {relative:.1e}, tolerance {tolerance:.0e}), "
          f"greedy flags identical: {same_greedy}, per-neuron accuracies identical: {same_acc}")
    if not (relative <= tolerance and same_nan and same_greedy and same_acc):
        sys.exit("the engines disagree")

    k = len(neurons)
    naive_per = naive_s / k
    fast_per = timings["neurons_s"] / k
    naive_full = naive_per * full
    fast_full = timings["prefix_s"] + fast_per * full
    print(f"naive: {naive_s:8.2f} s for {k} neurons = {naive_per:.3f} s/neuron")
    print(f"fast:  {fast_s:8.2f} s for {k} neurons = {fast_s / k:.3f} s/neuron all-in "
          f"(shared prefix {timings['prefix_s']:.2f} s once + {fast_per:.3f} s/neuron)")
    print(f"speedup at {k} neurons: {naive_s / fast_s:.2f}")
    print(f"projected {full} neurons: naive {naive_full / 60:.1f} min, fast {fast_full / 60:.1f} min")
    print(f"speedup: {naive_full / fast_full:.2f}")


if __name__ == "__main__":
    main()
