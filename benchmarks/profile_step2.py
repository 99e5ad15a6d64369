"""Step 2 at its default arguments on this CPU, projected from measured pieces, and what dominates.

    python benchmarks/profile_step2.py                     # mamba-130m's shape, 2 held-out docs per task
    python benchmarks/profile_step2.py --family mamba2

`step2_steering_factor_determination.py --perplexity_ablation` at its defaults does three things on
the held-out examples (100 per task of the six tasks, `--num_examples`):
- the factor table: each of the 14 factors on each of the two groups, a scoring of the examples
  each, plus the baseline (29 scorings);
- the importance ranking: every neuron step 1 measured (all 1536 of mamba-130m's layer 20, 24 heads
  on Mamba-2) ablated alone by the fast engine, one sweep (so one prefix) per chunk of 64 neurons;
- perplexity: 100 Pile documents (`--pile_samples`, up to 512 tokens each) at baseline and with the
  High Impact neurons ablated and amplified at every layer (1 + 2 x 24 runs).
Each piece is timed here on a sample (the first --docs held-out documents of each task from
--data_dir, the first --pile_docs evaluation documents of --pile_path) and scaled linearly to those
defaults; the fast engine's prefix and per-neuron times are separated as in bench_sweep.py. The
model is random (mamba-130m's or mamba2-130m's shape, float32), so only the times mean anything.
The last line names the piece that dominates. A perplexity run is also what step 3 adds to each
configuration's generation (9 configurations at --both).
"""

from __future__ import annotations

import argparse
import math

import torch
from workload import SHARED_DATA, TASKS, load_tokenizer, model_shaped, timed

from delta_steering.data.pile import load_pile_texts
from delta_steering.data.tasks import load_examples
from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.engine.perplexity import document_losses
from delta_steering.engine.scoring import encode_examples, score_examples
from delta_steering.intervention import Intervention
from delta_steering.model.sites import num_delta_neurons, ssm_layers

NUM_EXAMPLES = 100  # step 2's --num_examples: held-out examples per task
FACTORS = 14  # step 2's default --factors
GROUPS = 2  # High Impact and Neutral
CHUNK = 64  # --chunk_neurons: one fast-engine sweep (one prefix) per chunk of ranked neurons
PILE_SAMPLES = 100  # --pile_samples
LAYER = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mamba", choices=["mamba", "mamba2"])
    parser.add_argument("--docs", type=int, default=2, help="held-out documents per task timed")
    parser.add_argument("--neurons", type=int, default=4, help="neurons the fast engine sweeps (per-neuron time)")
    parser.add_argument("--pile_docs", type=int, default=4, help="Pile documents timed")
    parser.add_argument("--data_dir", default=str(SHARED_DATA / "tasks_hf"))
    parser.add_argument("--pile_path", default=str(SHARED_DATA / "pile" / "pile_text.jsonl"))
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"))
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = model_shaped(args.family, torch.float32, "cpu", 0)
    tokenizer = load_tokenizer(args.tokenizer)
    examples = load_examples(list(TASKS), args.data_dir, "heldout", args.docs)
    encoded = encode_examples(tokenizer, examples)
    texts = load_pile_texts(args.pile_docs, 0, args.pile_path, role="evaluation")
    ablation = Intervention.scale(range(num_delta_neurons(model)), 0.0)
    sweep = ablation.only(list(range(args.neurons)))
    print(f"model: {args.family}-130m shape, random weights, float32 ({torch.get_num_threads()} CPU threads); "
          f"{len(examples)} held-out examples ({args.docs} per task, {len(encoded)} requests), "
          f"{len(texts)} Pile documents")

    score_examples(model, tokenizer, examples, None, encoded=encoded)  # warm-up, and the reading choices measured
    fast_loglikelihoods(model, tokenizer, encoded, LAYER, ablation.only([0]), None)
    _, score_s = timed(lambda: score_examples(model, tokenizer, examples, None, encoded=encoded), "cpu")
    timings: dict = {}
    fast_loglikelihoods(model, tokenizer, encoded, LAYER, sweep, None, timings=timings)
    _, perplexity_s = timed(lambda: document_losses(model, tokenizer, texts), "cpu")

    scale = NUM_EXAMPLES / args.docs
    neurons, layers = num_delta_neurons(model), len(ssm_layers(model))
    per_neuron = timings["neurons_s"] / args.neurons
    pieces = {
        f"factor table ({FACTORS} factors x {GROUPS} groups + baseline, a scoring each)":
            (FACTORS * GROUPS + 1) * score_s * scale,
        f"importance ranking ({neurons} neurons, {math.ceil(neurons / CHUNK)} prefixes)":
            (math.ceil(neurons / CHUNK) * timings["prefix_s"] + neurons * per_neuron) * scale,
        f"perplexity (1 + 2 x {layers} layers, {PILE_SAMPLES} documents each)":
            (1 + 2 * layers) * perplexity_s * PILE_SAMPLES / len(texts),
    }
    print(f"measured: a scoring {score_s:.2f} s; fast engine prefix {timings['prefix_s']:.2f} s, "
          f"{per_neuron:.3f} s per neuron; perplexity {perplexity_s / len(texts):.2f} s per document")
    total = sum(pieces.values())
    for name, seconds in pieces.items():
        print(f"  {name}: {hours(seconds)} ({100 * seconds / total:.0f}%)")
    print(f"a perplexity run over {PILE_SAMPLES} documents (step 3 adds one per configuration): "
          f"{PILE_SAMPLES * perplexity_s / len(texts) / 60:.1f} min")
    print(f"projected default step 2 (--perplexity_ablation) on this CPU: {hours(total)}")
    print(f"dominated by: {max(pieces, key=pieces.get)}")


if __name__ == "__main__":
    main()
