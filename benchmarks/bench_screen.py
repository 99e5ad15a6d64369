"""How many of the neurons that exact ablation finds significant does each attribution screen pick?

    python benchmarks/bench_screen.py                        # the demo model, layer 20, its 4 tasks
    python benchmarks/bench_screen.py --top 12,24,48         # recall at several --verify_top
    python benchmarks/bench_screen.py --model 130m --data_dir ../shared/data/tasks_hf --docs 50 --device cuda
    python benchmarks/bench_screen.py --model 130m --data_dir ../shared/data/tasks_hf --docs 10 --sample 40 \\
        --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande --top 50,100,200   # margins need no lambada

Every delta neuron of the layer is zero-ablated exactly by the fast engine (step 1's `--method
exact`: impacts, sign tests, Benjamini-Hochberg over the layer) and estimated by each screen of
`engine.attribution` ("gradient": first order in dt_pre; "mixer": the ablated block exact, first
order after it). For each screen and each K it prints the recall: the share of the exactly
significant neurons (q < 0.05) among the screen's top K (step 1's choice of neurons to re-measure),
then each significant neuron's rank under each screen, and the Spearman correlation of the estimated
margin loss with the exact impact over the neurons measured. `--model 130m` is a random-weight model
of mamba-130m's shape (benchmarks/workload.py) with the GPT-NeoX tokenizer, on the study's six tasks
from `--data_dir`.
`--sample N` measures exactly only a seeded random sample of N neurons (the screens still rank all):
significance (Benjamini-Hochberg over the sample), recall and Spearman are then the sample's.

A random-weight model answers at chance, and ablating one of its neurons rarely flips an answer, so
significance may find nothing to recall. The run therefore also measures each neuron's exact margin
loss (the screens' continuous score, `analysis.estimates`: the task-weighted mean drop of the label's
lead over the best other choice) on the tasks without greedy examples (lambada's greedy margin needs
the logits), and prints the Spearman correlation of each screen's estimate with it and the recall of
the exact top decile by margin loss.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from workload import load_tokenizer, model_shaped

from delta_steering.analysis.estimates import estimated_impacts, example_margins
from delta_steering.analysis.impacts import estimate_records, neuron_impacts, recall_sample, top_estimated
from delta_steering.analysis.metrics import CHOICE_SCORES, correctness, example_weights
from delta_steering.analysis.stats import is_significant, spearman
from delta_steering.data.tasks import load_examples
from delta_steering.engine.attribution import SCREENS, attribution
from delta_steering.engine.scoring import encode_examples, loglikelihoods
from delta_steering.engine.sweep import sweep_loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.model.loading import load_mamba_model
from delta_steering.model.sites import num_delta_neurons

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "mamba-tiny-demo"
DEMO_TASKS = ",".join(str(DEMO / "demo_data" / f"{t}.jsonl") for t in ("ifeval_format", "copying", "counting",
                                                                        "agreement"))
SIX_TASKS = "lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande"


def load(args):
    """(model, tokenizer, examples) of the run."""
    if args.model == "130m":
        model = model_shaped("mamba", torch.float32, args.device, args.seed)
        tokenizer = load_tokenizer(args.tokenizer)
        tasks = args.tasks or SIX_TASKS
    else:
        model, tokenizer = load_mamba_model(args.model, args.device)
        tasks = args.tasks or DEMO_TASKS
    return model, tokenizer, load_examples(tasks.split(","), args.data_dir, "discovery", args.docs)


def exact_margin_loss(examples, base_logprob: np.ndarray, ablated_logprob: np.ndarray) -> np.ndarray | None:
    """Each measured neuron's exact margin loss (`estimated_impacts`' score, from exact log-probs);
    None when some example is greedy (its margin needs the logits)."""
    if any(CHOICE_SCORES[e.metric] is None for e in examples):
        return None
    weights = example_weights(examples)
    base = example_margins(examples, base_logprob)
    return (base[None, :] - example_margins(examples, ablated_logprob)) @ weights / 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO), help="a model directory, or 130m (random weights)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/tokenizers/gpt-neox-20b/tokenizer.json"))
    parser.add_argument("--tasks", default=None, help="default: the demo's 4 tasks, or the six tasks for 130m")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--docs", type=int, default=200, help="discovery examples per task")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--top", default="12,24,48", help="the K of recall at K (step 1's --verify_top)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=None, help="measure exactly only N random neurons")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, examples = load(args)
    every = list(range(num_delta_neurons(model)))
    neurons = recall_sample(every, args.sample, args.seed) if args.sample else every
    encoded = encode_examples(tokenizer, examples)
    ablation = Intervention.ablation("zero", neurons)
    print(f"{args.model}, layer {args.layer}: {len(neurons)} of {len(every)} neurons zero-ablated on {len(examples)} "
          f"discovery examples ({len(encoded)} requests)")

    start = time.perf_counter()
    base_scores = loglikelihoods(model, tokenizer, encoded)
    baseline = correctness(examples, *base_scores)
    swept = sweep_loglikelihoods(model, tokenizer, encoded, args.layer, ablation, "fast")
    ablated = np.stack([correctness(examples, lp, g) for lp, g in zip(*swept)])
    records = neuron_impacts(examples, baseline, ablated, neurons, [0.0] * len(every), args.seed)
    exact = {r["neuron"]: r for r in records}
    significant = sorted(n for n, r in exact.items() if is_significant(r["q_value"]))
    print(f"exact (fast engine): {time.perf_counter() - start:.1f} s; {len(significant)} significant (BH q < 0.05): "
          + ", ".join(f"{n} ({exact[n]['impact']:+.2f})" for n in significant))

    margin_loss = exact_margin_loss(examples, base_scores[0], swept[0])
    top_decile = np.argsort(-margin_loss)[:max(1, len(neurons) // 10)] if margin_loss is not None else []
    decile = {neurons[k] for k in top_decile}
    tops = [int(k) for k in args.top.split(",")]
    ranks = {}
    print(f"{'screen':>9}  {'seconds':>7}  " + "  ".join(f"recall@{k:<4}" for k in tops) + "  Spearman(measured)"
          + "  margin: Spearman, top-decile recall@" + ",".join(map(str, tops)))
    for screen in SCREENS:
        start = time.perf_counter()
        att = attribution(model, tokenizer, examples, encoded, args.layer, Intervention.ablation("zero", every),
                          screen=screen)
        seconds = time.perf_counter() - start
        estimates = estimate_records(every, *estimated_impacts(examples, att))
        ranked = sorted(estimates, key=lambda e: (-e["estimated_impact"], -e["estimated_margin_loss"], e["neuron"]))
        ranks[screen] = {e["neuron"]: k + 1 for k, e in enumerate(ranked)}
        recalls = [len(set(top_estimated(estimates, k)) & set(significant)) for k in tops]
        rho = spearman([estimates[n]["estimated_margin_loss"] for n in neurons], [exact[n]["impact"] for n in neurons])
        shown = "  ".join(f"{r:>2}/{len(significant):<2} {r / len(significant):4.0%}" if significant
                          else "  undefined" for r in recalls)  # no significant neuron: nothing to recall
        margin = "n/a (greedy examples)" if margin_loss is None else (
            f"{spearman([estimates[n]['estimated_margin_loss'] for n in neurons], list(margin_loss)):+.3f}, "
            + ", ".join(f"{len(set(top_estimated(estimates, k)) & decile)}/{len(decile)}" for k in tops))
        print(f"{screen:>9}  {seconds:7.1f}  {shown}  {'n/a' if rho is None else f'{rho:+.3f}':>18}  {margin}")
    print("rank of each significant neuron (of " + f"{len(every)}): " + "; ".join(
        f"{n}: " + ", ".join(f"{s} {ranks[s][n]}" for s in SCREENS) for n in significant))


if __name__ == "__main__":
    main()
