"""What offloading costs: a model of mamba-790m's shape (random weights, no download, 3.2 GB in
float32) loaded whole in CPU memory, and spread by `--device auto` with a small `--max_memory` (the
blocks that do not fit read from disk at each forward), on the study's six tasks' requests.

    python benchmarks/bench_offload.py                          # cpu=1GiB: a third of the model in memory
    python benchmarks/bench_offload.py --max_memory cpu=1GiB cpu=400MB

The model is saved once (safetensors) to a temporary folder and loaded from there by the project's
loader, in memory (`--device cpu`) and offloaded (`--device auto --max_memory M --offload_folder`),
one at a time. Each does what the steps do most: scoring every request (step 1's baseline, step 2's
factors) and a fast-engine sweep of K neurons at a late layer (step 1's ablations); the in-memory
model runs before and after the offloaded ones and its times are averaged, so that a load that drifts
weighs on all alike. The offloaded blocks are read from the checkpoint's file at each forward: on a
machine whose memory holds the file in the OS page cache (this one) that costs copying, not disk
reads. The results must be identical (the same operations on the same CPU); the run exits 1 if not.
The last lines are `offload cost (M): scoring X, sweep Y`: offloaded time over in-memory time.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from workload import SHAPES, add_arguments, describe, load_tokenizer, model_shaped, requests, timed

from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.engine.scoring import loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.model.loading import check_model_source, describe as describe_model, load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, docs=2)
    parser.add_argument("--size", default="790m", choices=list(SHAPES), help="whose shape the model has")
    parser.add_argument("--max_memory", nargs="+", default=["cpu=1GiB"], help="one offloaded run per value")
    parser.add_argument("--neurons", type=int, default=4, help="K neurons swept by the fast engine")
    parser.add_argument("--layer", type=int, default=-4, help="the swept layer (negative: from the end)")
    return parser.parse_args()


def measure(model, tokenizer, encoded, layer: int, neurons: list[int]) -> dict:
    """Seconds and results of scoring every request (read whole) and of sweeping the neurons."""
    scores, scoring_s = timed(lambda: loglikelihoods(model, tokenizer, encoded, share_contexts=False), "cpu")
    ablation = Intervention.scale(neurons, 0.0)
    sweep, sweep_s = timed(lambda: fast_loglikelihoods(model, tokenizer, encoded, layer, ablation,
                                                       share_contexts=False), "cpu")
    return {"scoring_s": scoring_s, "sweep_s": sweep_s, "results": (*scores, *sweep)}


def run(directory: Path, encoded, args, neurons: list[int], **placement) -> dict:
    """Load the saved model as `placement` says, measure, and free it again."""
    (model, tokenizer), load_s = timed(lambda: load_model(str(directory), dtype="float32", **placement), "cpu")
    out = {"load_s": load_s, "device": describe_model(model)["device"],
           **measure(model, tokenizer, encoded, args.layer, neurons)}
    del model
    gc.collect()
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_offload_"))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work)


def compare(args: argparse.Namespace, work: Path) -> None:
    """Save the model to `work`, then measure it in memory and offloaded, and print the ratios."""
    model = model_shaped(args.family, torch.float32, "cpu", args.seed, size=args.size)
    args.layer %= model.config.num_hidden_layers
    _, _, encoded = requests(args, model.config.vocab_size)
    model.save_pretrained(work / "model")
    load_tokenizer(args.tokenizer).save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    n_delta = check_model_source(str(work / "model")).shape.delta_neurons
    neurons = sorted(np.random.default_rng(args.seed).choice(n_delta, args.neurons, replace=False).tolist())
    print(f"model: {args.family}-{args.size} shape, random weights ({params / 1e6:.0f}M parameters), float32 on the CPU "
          f"({torch.get_num_threads()} threads); {describe(encoded)}; sweep: {len(neurons)} neurons at layer "
          f"{args.layer}, contexts read whole")

    before = run(work / "model", encoded, args, neurons, device="cpu")
    offloaded = {m: run(work / "model", encoded, args, neurons, device="auto", max_memory=m,
                        offload_folder=str(work / "offload")) for m in args.max_memory}
    after = run(work / "model", encoded, args, neurons, device="cpu")
    memory = {k: (before[k] + after[k]) / 2 for k in ("load_s", "scoring_s", "sweep_s")}
    print(f"in memory: load {before['load_s']:.1f} s / {after['load_s']:.1f} s, scoring {before['scoring_s']:.1f} s / "
          f"{after['scoring_s']:.1f} s, sweep {before['sweep_s']:.1f} s / {after['sweep_s']:.1f} s (before / after)")
    ok = True
    for name, m in offloaded.items():
        same = all(np.array_equal(a, b) for a, b in zip(m["results"], before["results"]))
        ok &= same
        print(f"{name}: {m['device']}\n  load {m['load_s']:.1f} s, scoring {m['scoring_s']:.1f} s, sweep "
              f"{m['sweep_s']:.1f} s; results identical to the model in memory: {same}")
    if not ok:
        sys.exit("offloaded and in-memory results differ")
    for name, m in offloaded.items():
        print(f"offload cost ({name}): scoring {m['scoring_s'] / memory['scoring_s']:.2f}x, "
              f"sweep {m['sweep_s'] / memory['sweep_s']:.2f}x")


if __name__ == "__main__":
    main()
