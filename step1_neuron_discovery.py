"""Step 1: discover which delta neurons of a Mamba layer matter, by ablating each one on its own.

    python step1_neuron_discovery.py --save_path discovered_neurons.json
    python step1_neuron_discovery.py --model models/mamba-tiny-demo --device cpu \\
        --tasks models/mamba-tiny-demo/demo_data/recall.jsonl --save_path out.json --neurons 0-31

Baseline accuracy on the discovery examples, per-neuron delta variance on Pile texts, then every
neuron in --neurons ablated alone: impact = baseline - ablated accuracy (points; positive = the
neuron helps), with a paired bootstrap 95% CI, an exact sign-test p-value and BH q-values.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from delta_steering import delta_statistics, num_delta_neurons, verify_steering_effect
from delta_steering.cli import (UsageError, add_model_args, add_pile_args, add_sweep_args, check_layer, check_neuron_ids,
                                check_positive, load_model, main_guard, parse_int_list)
from delta_steering.discovery import (attach_estimates, attribution_screen, discovery_result,
                                      neuron_chunks, neuron_impacts, print_summary)
from delta_steering.distributed import Workers, add_distributed_args, finish, read_shards, start_workers
from delta_steering.results_io import run_record, write_json
from delta_steering.scoring import chance_correctness, encode_examples, evaluate, summarize
from delta_steering.sweep import Intervention, sweep_correctness
from delta_steering.tasks import DEFAULT_TASKS, load_examples
from mamba_model_loader import describe
from pile_dataset_loader import load_pile_texts, pile_record

STEP = "step1"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--save_path", required=True, help="where the discovery JSON goes")
    parser.add_argument("--validation_size", type=int, default=200, help="discovery examples per task")
    parser.add_argument("--output_dir", default="ablation_3_results", help="plots and the resume checkpoint")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="built-in task names or .jsonl files")
    parser.add_argument("--data_dir", default=None, help="local task data: DIR/<task>/<split>.jsonl")
    parser.add_argument("--threshold", type=float, default=-2.0, help="beneficial: impact >= threshold")
    parser.add_argument("--neurons", default=None, help="ids and ranges, e.g. 0-127 (default: all)")
    parser.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    add_sweep_args(parser)
    parser.add_argument("--method", default="exact", choices=["exact", "attribution"],
                        help="attribution: first-order estimates of every neuron, then --verify_top re-measured")
    parser.add_argument("--verify_top", type=int, default=50, help="neurons re-measured exactly after attribution")
    add_pile_args(parser)
    add_distributed_args(parser)
    parser.add_argument("--no_plots", action="store_true")
    return parser.parse_args()


def fingerprint(args) -> dict:
    """The arguments that change results; engine, batch size, device and the work split do not."""
    keys = ("model", "tokenizer", "dtype", "seed", "validation_size", "layer", "tasks", "data_dir", "ablation",
            "neurons", "pile_samples", "pile_path", "method", "verify_top")
    return {k: getattr(args, k) for k in keys}


def measure(args, workers: Workers, examples: list) -> tuple[dict, dict]:
    """What every process computes alike (the context: baseline, delta statistics, attribution screen)
    and the correctness rows of the neurons: this process's share, or under torchrun all of them."""
    model, tokenizer = load_model(args)
    layer = check_layer(model, args.layer)
    requested = parse_int_list(args.neurons)
    neurons = check_neuron_ids(model, requested) if requested else list(range(num_delta_neurons(model)))
    checkpoint = workers.checkpoint(args, STEP, fingerprint(args))
    timings = {}

    texts = load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="statistics")
    t = time.time()
    stats = delta_statistics(model, tokenizer, texts, layer)
    timings["delta_statistics"] = round(time.time() - t, 2)
    means = tuple(float(v) for v in stats["dt_pre_mean"]) if args.ablation == "mean" else None
    intervention = Intervention("mean" if args.ablation == "mean" else "scale", 0.0, means)
    verify_steering_effect(model, layer, neurons[:8], lambda: intervention.install(model, layer, neurons[0]))

    encoded = encode_examples(tokenizer, examples)
    t = time.time()
    baseline = evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded)
    timings["baseline"] = round(time.time() - t, 2)
    base = summarize(examples, baseline)
    if base["accuracy"] is None:
        raise UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    chance = summarize(examples, chance_correctness(examples))
    print(f"Baseline accuracy {base['accuracy']:.2f}% (chance {chance['accuracy']:.2f}%) on {len(examples)} "
          f"discovery examples (layer {layer})")
    for name, value in base["per_task"].items():
        print(f"  {name:>24}: {value:6.2f}%  (chance {chance['per_task'][name]:5.2f}%, "
              f"{sum(e.task == name for e in examples)} examples)")

    screened = {"requested_neurons": neurons}
    if args.method == "attribution":
        t = time.time()
        estimates, neurons = attribution_screen(model, tokenizer, examples, encoded, layer, neurons, intervention,
                                                args.batch_size, args.verify_top)
        timings["attribution"] = round(time.time() - t, 2)
        screened.update(attribution_estimates=estimates, verified_neurons=neurons)

    def ablate(chunk: list[int]) -> dict:
        rows = sweep_correctness(model, tokenizer, examples, layer, chunk, intervention, args.engine,
                                 args.batch_size, encoded)
        return {str(n): row.tolist() for n, row in zip(chunk, rows)}

    t = time.time()
    rows = workers.run(neuron_chunks(neurons, args.chunk_neurons), ablate,
                       f"ablating layer {layer}, {args.chunk_neurons} neurons a chunk", checkpoint)
    timings["sweep"] = round(time.time() - t, 2)
    context = {"layer": layer, "neurons": neurons, "baseline": baseline.tolist(), "screened": screened,
               "delta_statistics": {"delta_variance": stats["delta_variance"].tolist(),
                                    "dt_pre_mean": [float(v) for v in stats["dt_pre_mean"]],
                                    "num_tokens": int(stats["num_tokens"]),
                                    "documents": pile_record(texts, "statistics")},
               "model_info": describe(model), "timings": timings}
    return context, rows


def requested_tasks(args) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def report(args, context: dict, rows: dict, examples: list, started: float) -> None:
    """Impacts, statistics, the JSON, the console summary and the plots, from the measured rows."""
    neurons, baseline = context["neurons"], np.array(context["baseline"], dtype=float)
    ablated = np.array([rows[str(n)] for n in neurons], dtype=float)
    stats = context["delta_statistics"]
    screened = dict(context["screened"])
    unmeasured = sorted(set(screened.pop("requested_neurons")) - set(neurons))
    records = neuron_impacts(examples, baseline, ablated, neurons, stats["delta_variance"], args.seed, unmeasured)
    if screened:
        screened.update(attach_estimates(records, screened["attribution_estimates"]))
        rhos = [screened[k] for k in ("spearman_estimated_impact", "spearman_margin_loss")]
        shown = ["n/a" if r is None else f"{r:.3f}" for r in rhos]
        print(f"attribution vs exact impact on {len(neurons)} verified neurons: Spearman {shown[0]} "
              f"(estimated impact), {shown[1]} (estimated margin loss)")
    result = discovery_result(examples, baseline, records, args.threshold, context["layer"], args.model,
                              requested_tasks(args), args.validation_size, stats, data_dir=args.data_dir, ablation=args.ablation,
                              engine=args.engine, method=args.method, neurons_tested=len(neurons) + len(unmeasured), **screened)
    result["run"] = run_record(args, context["model_info"], started, timings=context["timings"])
    write_json(args.save_path, result)
    print_summary(result)
    if not args.no_plots:
        from delta_steering.plots import plot_discovery

        for path in plot_discovery(result, args.output_dir):
            print(f"plot: {path}")
    print(f"results: {args.save_path}")


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    check_positive(args.validation_size, "--validation_size")
    check_positive(args.verify_top, "--verify_top")
    check_positive(args.chunk_neurons, "--chunk_neurons")
    workers = start_workers(args)
    examples = load_examples(requested_tasks(args), args.data_dir, "discovery", args.validation_size)
    if args.merge is not None:
        context, rows = read_shards(args.merge, args.output_dir, STEP, fingerprint(args))
        return report(args, context, rows, examples, started)
    context, rows = measure(args, workers, examples)
    finish(args, workers, STEP, fingerprint(args), context, rows, lambda: report(args, context, rows, examples, started))


if __name__ == "__main__":
    main()
