"""One cached generation step of mamba2-130m's shape (random weights, float32, CPU): transformers'
functions against the project's (`mamba2.lean_state_update`: the one-token state update with less
arithmetic, and the scan's step updating the cache in place), and against the lean update alone.
A step's cost depends on its shape alone (rows, layers, heads, state), not on the tokens, so the
rows step from a two-token prompt each.

    python benchmarks/bench_step.py                 # 1, 8, 16 and 32 rows

Each variant steps on its own cache, the variants taking turns (so that a drift of the machine's
speed favours none); a variant's time is the least of --repeats steps. The run checks that every
step's logits are equal bit for bit across the variants (it exits 1 if not), and prints each row
count's times, last `ratio: X`, transformers' time / ours at 8 rows (the rows generation runs at by
default on CPU; step 3 measures its own, `generation.batch_size_for`).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import torch
from workload import model_shaped

from delta_steering.engine import generation
from delta_steering.model.mamba2 import lean_state_update, state_update
from delta_steering.model.sites import decoder_layers

VARIANTS = ("transformers", "lean update alone", "ours")


@contextmanager
def variant(model, name: str):
    """While open, the model steps with transformers' functions, the lean update alone, or ours."""
    if name == "ours":
        with lean_state_update(model):
            yield
        return
    module = sys.modules[type(decoder_layers(model)[0].mixer).__module__]
    reference = module.mamba2_selective_state_update
    if name == "lean update alone":
        module.mamba2_selective_state_update = state_update(reference)
    try:
        yield
    finally:
        module.mamba2_selective_state_update = reference


@torch.no_grad()
def step_times(model, rows: int, repeats: int) -> dict[str, float]:
    """The least time of a step of `rows` rows per variant; exits 1 where their logits differ."""
    caches = {name: generation.prefill(model, [[0, 0]] * rows, 0)[0] for name in VARIANTS}
    inputs = torch.zeros(rows, 1, dtype=torch.long)
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(repeats):
        logits = {}
        for name in VARIANTS:
            with variant(model, name):
                start = time.perf_counter()
                logits[name] = model(input_ids=inputs, cache=caches[name], use_cache=True).logits
                best[name] = min(best[name], time.perf_counter() - start)
        if not all(torch.equal(logits[name], logits["transformers"]) for name in VARIANTS):
            sys.exit(f"{rows} rows: the variants' logits differ")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5, help="steps per variant and row count")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="the random model's weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_shaped("mamba2", torch.float32, "cpu", args.seed)
    print(f"model: mamba2-130m shape, random weights, float32 on cpu ({torch.get_num_threads()} CPU threads); "
          f"the least of {args.repeats} steps, logits equal bit for bit in every step")
    times = {}
    for rows in args.rows:
        times[rows] = step_times(model, rows, args.repeats)
        print(f"{rows} rows: " + ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in times[rows].items())
              + f"; ours / transformers {times[rows]['ours'] / times[rows]['transformers']:.2f}", flush=True)
    if 8 in times:
        print(f"ratio: {times[8]['transformers'] / times[8]['ours']:.2f}")


if __name__ == "__main__":
    main()
