"""Where the whole-request method's time goes on the study's six tasks' requests (`--data_dir`, by
default ../shared/data/tasks_hf beside the repository), and the ceilings on a single-neuron engine's
speedup that follow, in seconds rather than FLOPs.

    python benchmarks/profile_sweep.py                  # mamba-130m's shape, 2 discovery docs per task
    python benchmarks/profile_sweep.py --family mamba2

An exact engine must still run the blocks after layer L and the LM head at the scored positions, so
its per-neuron time is at least (blocks after L) + head. Counted in FLOPs the head is about a tenth
of a request's cost; timed, it is much less, because the blocks' reference selective scan (a loop
over tokens, no fused kernel on CPU) runs far below the head's matrix-multiply rate. The ceilings
printed here use the measured split: the blocks' time (forward hooks on every block), the head's
(`OutputHead` calls), and the share of tokens left when shared contexts are read once. The head's
time is taken twice: as the whole-request method spends it, and as the fast engine does, which
applies it to many chunks' rows in one large call (cheaper per row on CPU). The ceilings hold if a
block costs per token what it costs in the whole-request method.
"""

from __future__ import annotations

import argparse
import time

import torch
from workload import add_arguments, describe, model_shaped, requests

from delta_steering.model import sites
from delta_steering.engine.batching import Encoded
from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.engine.scoring import loglikelihoods, shared_context_groups
from delta_steering.model.sites import decoder_layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, docs=2)
    parser.add_argument("--layer", type=int, default=20, help="L: the engine runs blocks L+1..end per neuron")
    parser.add_argument("--neurons", type=int, default=4, help="neurons the fast engine sweeps to time its LM head")
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


def tokens_read(encoded: list[Encoded]) -> tuple[int, int]:
    """Model inputs read with every request whole, and with each shared context read once."""
    whole = sum(len(e.tokens) - 1 for e in encoded)
    groups = shared_context_groups(encoded)
    inside = {i for g in groups for i in g}
    shared = sum(len(e.tokens) - 1 for i, e in enumerate(encoded) if i not in inside) + sum(
        encoded[g[0]].context_length + sum(encoded[i].n_target - 1 for i in g) for g in groups)
    return whole, shared


class Stopwatch:
    """Seconds spent inside every decoder block and inside the LM head, while installed."""

    def __init__(self, model):
        self.blocks = self.head = 0.0
        self.started: dict[int, float] = {}
        for index, block in enumerate(decoder_layers(model)):
            block.register_forward_pre_hook(lambda _m, _a, i=index: self.started.__setitem__(i, time.perf_counter()))
            block.register_forward_hook(lambda _m, _a, _o, i=index: self.add_block(i))
        head_call = sites.OutputHead.__call__

        def timed_head(head, hidden):
            start = time.perf_counter()
            out = head_call(head, hidden)
            self.head += time.perf_counter() - start
            return out

        sites.OutputHead.__call__ = timed_head

    def add_block(self, index: int) -> None:
        self.blocks += time.perf_counter() - self.started.pop(index)


def ceilings(total: float, blocks: float, head: float, after: float, kept: float) -> str:
    """The speedups an exact engine running the blocks after L and the head could reach at most."""
    return (f"reading requests whole {total / (blocks * after + head):.2f}x the whole-request method; sharing "
            f"contexts {total / (blocks * after * kept + head):.2f}x the whole-request method and "
            f"{(blocks * kept + head) / (blocks * after * kept + head):.2f}x the naive engine (both sharing)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = model_shaped(args.family, torch.float32, args.device, args.seed)
    tokenizer, _, encoded = requests(args, model.config.vocab_size)
    layers = len(decoder_layers(model))
    after = (layers - 1 - args.layer) / layers  # the share of blocks an exact engine runs per neuron
    whole, shared = tokens_read(encoded)
    kept = shared / whole
    ablation = Intervention.scale(list(range(args.neurons)), 0.0)
    print(f"model: {args.family}-130m shape, random weights, float32 on {args.device} ({torch.get_num_threads()} "
          f"CPU threads); {describe(encoded)}; layer {args.layer}: {layers - 1 - args.layer} of {layers} blocks after it")
    print(f"tokens read: {whole} with every request whole, {shared} with shared contexts read once ({kept:.2f})")
    loglikelihoods(model, tokenizer, encoded, share_contexts=False)  # warm-up
    fast_loglikelihoods(model, tokenizer, encoded, args.layer, ablation)
    watch = Stopwatch(model)
    for _ in range(args.repeats):
        watch.blocks = watch.head = 0.0
        start = time.perf_counter()
        loglikelihoods(model, tokenizer, encoded, share_contexts=False)
        total = time.perf_counter() - start
        blocks, head = watch.blocks, watch.head
        watch.head = 0.0
        fast_loglikelihoods(model, tokenizer, encoded, args.layer, ablation)
        fast_head = watch.head / args.neurons
        print(f"whole-request method, one neuron: {total:.2f} s = blocks {blocks:.2f} s ({blocks / total:.1%}), "
              f"LM head {head:.2f} s ({head / total:.1%}), the rest {total - blocks - head:.2f} s; the fast engine's "
              f"LM head per neuron ({args.neurons} neurons, their rows in large calls): {fast_head:.2f} s")
        print(f"  ceilings with the head at its whole-request time: {ceilings(total, blocks, head, after, kept)}")
        print(f"  with the head at the fast engine's time: {ceilings(total, blocks, fast_head, after, kept)}")


if __name__ == "__main__":
    main()
