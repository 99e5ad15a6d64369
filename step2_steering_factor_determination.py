"""Step 2: determine steering factors for the delta neurons found in step 1, on held-out examples.

    python step2_steering_factor_determination.py --neurons_file discovered_neurons.json
    python step2_steering_factor_determination.py --model models/mamba-tiny-demo --device cpu \\
        --neurons_file demo_results/discovered_neurons.json --perplexity_ablation --pile_path texts.txt

Groups step 1's neurons into High Impact (impact > 2) and Neutral (|impact| <= 2), amplifies each
group as a whole by each factor and picks each group's optimal factor; re-measures single-neuron
impacts on held-out examples (does the discovery replicate?); optionally Pile perplexity per layer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from delta_steering import verify_steering_effect
from delta_steering.cli import (UsageError, add_model_args, add_pile_args, check_layer, check_positive, load_model,
                                main_guard, parse_float_list, parse_int_list)
from delta_steering.discovery import STEP1_DEFAULTS, impact_groups, load_discovery, locate
from delta_steering.factors import (DEFAULT_FACTORS, Comparison, amplify_group, importance_ranking, optimal_factor,
                                    print_group_table, ranked_neurons)
from delta_steering.perplexity import perplexity
from delta_steering.results_io import run_record, write_json
from delta_steering.scoring import encode_examples, evaluate
from delta_steering.steering import num_layers, steer
from delta_steering.sweep import ENGINES, Intervention, sweep_correctness
from delta_steering.tasks import BUILTIN_TASKS, load_examples
from mamba_model_loader import describe
from pile_dataset_loader import load_pile_texts

RESULTS_NAME = "cluster9_ablation_results_all_neurons.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num_examples", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--output_dir", default="cluster9_ablation_results")
    parser.add_argument("--neurons_file", default=None,
                        help=f"step-1 JSON (default: {' or '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--allow_model_mismatch", action="store_true")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--tasks", default=None, help="default: the step-1 file's tasks")
    parser.add_argument("--data_dir", default=None, help="default: the step-1 file's data_dir")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in DEFAULT_FACTORS))
    parser.add_argument("--max_neurons", type=int, default=None, help="rank only the N largest |step-1 impact|")
    parser.add_argument("--sample_neurons", type=int, default=None, help="rank N step-1 neurons drawn at random")
    parser.add_argument("--engine", default="fast", choices=list(ENGINES))
    parser.add_argument("--perplexity_ablation", action="store_true",
                        help="Pile perplexity with the High Impact neurons ablated / amplified at each layer")
    parser.add_argument("--perplexity_layers", default=None, help="layers for --perplexity_ablation (default: all)")
    add_pile_args(parser)
    parser.add_argument("--no_plots", action="store_true")
    return parser.parse_args()


def perplexity_by_layer(model, tokenizer, texts, layers, neurons, factor, batch_size) -> dict:
    """Pile perplexity at baseline and with the neurons ablated / amplified at each layer."""
    result = {"baseline": perplexity(model, tokenizer, texts, batch_size=batch_size), "neurons": neurons,
              "factor": factor, "layers": []}
    for layer in layers:
        entry = {"layer": layer}
        with steer(model, layer, neurons, 0.0):
            entry["ablated"] = perplexity(model, tokenizer, texts, batch_size=batch_size)
        if factor is not None:
            with steer(model, layer, neurons, factor):
                entry["amplified"] = perplexity(model, tokenizer, texts, batch_size=batch_size)
        result["layers"].append(entry)
        print(f"  layer {layer:>3}: ablated {entry['ablated']:.3f}"
              + (f", amplified x{factor:g} {entry['amplified']:.3f}" if factor is not None else ""))
    return result


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    check_positive(args.num_examples, "--num_examples")
    check_positive(args.max_neurons, "--max_neurons")
    check_positive(args.sample_neurons, "--sample_neurons")
    factors = parse_float_list(args.factors)
    if any(f <= 0 for f in factors):
        raise UsageError("--factors must be positive (0 is ablation, which step 1 measures)")
    step1_path = locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file", "--neurons_file")
    model, tokenizer = load_model(args)
    step1 = load_discovery(step1_path, model, args.model, args.allow_model_mismatch)
    layer = check_layer(model, args.layer if args.layer is not None else step1.get("layer", 20))
    tasks = args.tasks.split(",") if args.tasks else step1.get("tasks")
    if not tasks:
        raise UsageError(f"step-1 file {step1_path} names no tasks; pass --tasks")
    ppl_layers = parse_int_list(args.perplexity_layers, "perplexity_layers") or list(range(num_layers(model)))
    for other in ppl_layers:
        check_layer(model, other, "--perplexity_layers")
    data_dir = args.data_dir or step1.get("data_dir")
    examples = load_examples(tasks, data_dir, "heldout", args.num_examples)
    unpartitioned = [t for t in tasks if t not in BUILTIN_TASKS]  # custom .jsonl files
    if unpartitioned:
        print(f"note: custom task files have no held-out partition and are used in file order; they should "
              f"not be the files step 1 ran on: {', '.join(unpartitioned)}")
    groups = impact_groups(step1)
    verify_steering_effect(model, layer, groups["high_impact"] or groups["neutral"] or [0])

    encoded = encode_examples(tokenizer, examples)
    baseline = evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded)
    comparison = Comparison(examples, baseline, args.seed)
    base = comparison.base
    if base["accuracy"] is None:
        raise UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    print(f"Baseline accuracy {base['accuracy']:.2f}% on {len(examples)} held-out examples, layer {layer}")

    result = {"model": args.model, "layer": layer, "tasks": tasks, "data_dir": data_dir,
              "num_examples": args.num_examples, "step1_file": str(step1_path),
              "baseline_accuracy": base["accuracy"], "per_task_baseline": base["per_task"], "groups": {}}
    for name, neurons in groups.items():
        group = {"neurons": neurons, "results": [], "optimal": None}
        if neurons:
            group["results"] = amplify_group(model, tokenizer, examples, encoded, layer, neurons, factors,
                                             comparison, args.batch_size, name)
            group["optimal"] = optimal_factor(group["results"])
        result["groups"][name] = group
        print_group_table(name, group, base["accuracy"], layer)
    result["optimal_factors"] = {n: (g["optimal"] or {}).get("factor") for n, g in result["groups"].items()}

    ranked = ranked_neurons(step1["all_neuron_impacts"], args.max_neurons, args.sample_neurons, args.seed)
    means = step1.get("dt_pre_mean") if step1.get("ablation") == "mean" else None
    intervention = Intervention("mean", 0.0, tuple(means)) if means else Intervention("scale", 0.0)
    print(f"\nImportance ranking: {len(ranked)} neurons ablated one at a time on held-out examples")
    ablated = sweep_correctness(model, tokenizer, examples, layer, ranked, intervention, args.engine,
                                args.batch_size, encoded) if ranked else []
    result["importance_ranking"] = importance_ranking(step1["all_neuron_impacts"], ablated, ranked, comparison)
    rho = result["importance_ranking"]["spearman_step1_vs_heldout"]
    print(f"Spearman correlation of step-1 and held-out impacts: {'n/a' if rho is None else f'{rho:.3f}'}")

    if args.perplexity_ablation:
        if not groups["high_impact"]:
            print("perplexity ablation skipped: the High Impact group is empty")
        else:
            texts = load_pile_texts(args.pile_samples, args.seed, args.pile_path)
            print(f"\nPile perplexity ({len(texts)} documents), High Impact neurons at each layer:")
            result["perplexity"] = perplexity_by_layer(model, tokenizer, texts, ppl_layers, groups["high_impact"],
                                                       result["optimal_factors"]["high_impact"], args.batch_size)

    result["engine"] = args.engine
    result["run"] = run_record(args, describe(model), started)
    path = write_json(Path(args.output_dir) / RESULTS_NAME, result)
    if not args.no_plots:
        from delta_steering.plots import plot_factors

        for plot in plot_factors(result, args.output_dir):
            print(f"plot: {plot}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
