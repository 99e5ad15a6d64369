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
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from delta_steering import verify_steering_effect
from delta_steering.cli import (UsageError, add_model_args, add_pile_args, add_sweep_args, check_layer,
                                check_positive, load_model, main_guard, parse_float_list, parse_int_list)
from delta_steering.discovery import STEP1_DEFAULTS, impact_groups, load_discovery, locate, neuron_chunks
from delta_steering.distributed import Workers, add_distributed_args, finish, read_shards, start_workers
from delta_steering.factors import (DEFAULT_FACTORS, Comparison, group_result, importance_ranking, print_group_table,
                                    ranked_neurons, selection_split, steering_factor)
from delta_steering.perplexity import perplexity
from delta_steering.results_io import file_digest, run_record, write_json
from delta_steering.scoring import chance_correctness, encode_examples, evaluate, summarize
from delta_steering.tasks import example_ids
from delta_steering.steering import num_layers, steer
from delta_steering.sweep import Intervention, sweep_correctness
from delta_steering.tasks import load_examples
from mamba_model_loader import describe
from pile_dataset_loader import load_pile_texts, pile_record

RESULTS_NAME = "cluster9_ablation_results_all_neurons.json"
STEP = "step2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num_examples", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--output_dir", default="cluster9_ablation_results",
                        help="results, plots and the resume checkpoint")
    parser.add_argument("--neurons_file", default=None,
                        help=f"step-1 JSON (default: {' or '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--allow_model_mismatch", action="store_true")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--tasks", default=None, help="default: the step-1 file's tasks")
    parser.add_argument("--data_dir", default=None, help="default: the step-1 file's data_dir")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in DEFAULT_FACTORS))
    parser.add_argument("--max_neurons", type=int, default=None, help="rank only the N largest |step-1 impact|")
    parser.add_argument("--sample_neurons", type=int, default=None, help="rank N step-1 neurons drawn at random")
    add_sweep_args(parser)
    parser.add_argument("--perplexity_ablation", action="store_true",
                        help="Pile perplexity with the High Impact neurons ablated / amplified at each layer")
    parser.add_argument("--perplexity_layers", default=None, help="layers for --perplexity_ablation (default: all)")
    add_pile_args(parser)
    parser.add_argument("--no_plots", action="store_true")
    add_distributed_args(parser)
    return parser.parse_args()


def fingerprint(args) -> dict:
    """The arguments and step-1 file that change results; engine, batch size, device and the work
    split do not."""
    keys = ("model", "tokenizer", "dtype", "seed", "num_examples", "neurons_file", "allow_model_mismatch", "layer",
            "tasks", "data_dir", "factors", "max_neurons", "sample_neurons", "perplexity_ablation",
            "perplexity_layers", "pile_samples", "pile_path")
    step1_path = locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file", "--neurons_file")
    return {**{k: getattr(args, k) for k in keys}, "step1_sha256": file_digest(step1_path)}


def factor_key(group: str, factor: float) -> str:
    return f"factor/{group}/{factor!r}"


def perplexity_key(layer: int | None, factor: float | None) -> str:
    return f"perplexity/{layer}/{factor!r}"


class Measurements:
    """Step 2's units of work on the loaded model, each giving named results: a group amplified by a
    factor, a chunk of ranked neurons ablated one at a time, Pile perplexity with the High Impact
    neurons steered at one layer."""

    def __init__(self, args, model, tokenizer, examples, layer: int, groups: dict, intervention: Intervention):
        self.args, self.model, self.tokenizer, self.examples = args, model, tokenizer, examples
        self.layer, self.groups, self.intervention = layer, groups, intervention
        self.encoded = encode_examples(tokenizer, examples)
        self.texts = None

    def baseline(self) -> list[float]:
        return evaluate(self.model, self.tokenizer, self.examples, self.args.batch_size, progress=True,
                        encoded=self.encoded).tolist()

    def __call__(self, item: tuple) -> dict:
        kind, *rest = item
        model, batch_size = self.model, self.args.batch_size
        if kind == "factor":
            group, factor = rest
            with steer(model, self.layer, self.groups[group], factor):
                correct = evaluate(model, self.tokenizer, self.examples, batch_size, encoded=self.encoded)
            return {factor_key(group, factor): correct.tolist()}
        if kind == "neurons":
            rows = sweep_correctness(model, self.tokenizer, self.examples, self.layer, rest[0], self.intervention,
                                     self.args.engine, batch_size, self.encoded)
            return {f"neuron/{n}": row.tolist() for n, row in zip(rest[0], rows)}
        layer, factor = rest
        with steer(model, layer, self.groups["high_impact"], factor) if layer is not None else nullcontext():
            return {perplexity_key(layer, factor): perplexity(model, self.tokenizer, self.texts, batch_size=batch_size)}


def measure(args, workers: Workers, factors: list[float]) -> tuple[dict, dict, list]:
    """The context every process computes alike (baseline, groups, ranked neurons) and the results of
    this process's share of the work items."""
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
    groups = impact_groups(step1)
    verify_steering_effect(model, layer, groups["high_impact"] or groups["neutral"] or [0])
    ranked = ranked_neurons(step1["all_neuron_impacts"], args.max_neurons, args.sample_neurons, args.seed)
    means = step1.get("dt_pre_mean") if step1.get("ablation") == "mean" else None
    intervention = Intervention("mean", 0.0, tuple(means)) if means else Intervention("scale", 0.0)

    measurements = Measurements(args, model, tokenizer, examples, layer, groups, intervention)
    baseline = measurements.baseline()
    base = summarize(examples, np.array(baseline))
    if base["accuracy"] is None:
        raise UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    print(f"Baseline accuracy {base['accuracy']:.2f}% on {len(examples)} held-out examples, layer {layer}")
    perplexity_layers = ppl_layers if args.perplexity_ablation and groups["high_impact"] else []
    if perplexity_layers:
        measurements.texts = load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="evaluation")
    context = {"layer": layer, "tasks": tasks, "data_dir": data_dir, "step1_file": str(step1_path),
               "groups": groups, "factors": factors, "ranked": ranked, "step1_impacts": step1["all_neuron_impacts"],
               "baseline": baseline, "perplexity_layers": perplexity_layers,
               "pile_documents": pile_record(measurements.texts or [], "evaluation"), "model_info": describe(model)}

    items = [("factor", name, f) for name, neurons in groups.items() if neurons for f in factors]
    items += [("neurons", chunk) for chunk in neuron_chunks(ranked, args.chunk_neurons)]
    if perplexity_layers:
        items += [("perplexity", None, None)] + [("perplexity", l, 0.0) for l in perplexity_layers]
    checkpoint = workers.checkpoint(args, STEP, fingerprint(args))
    results = workers.run(items, measurements, "amplifying groups, ablating ranked neurons", checkpoint)
    if perplexity_layers:
        # the amplified perplexities need the High Impact optimal factor: a shard computes the factor
        # results it lacks (the same computations, so the same factor as every other slice)
        missing = [("factor", "high_impact", f) for f in factors if factor_key("high_impact", f) not in results]
        for item in missing:
            results.update(measurements(item))
        factor, _ = steering_factor(group_table("high_impact", context, results, examples, args.seed)["optimal"])
        if factor is not None:
            amplified = [("perplexity", l, factor) for l in perplexity_layers]
            results.update(workers.run(amplified, measurements, "perplexity with the optimal factor", checkpoint))
    return context, results, examples


def group_table(name: str, context: dict, results: dict, examples: list, seed: int) -> dict:
    """A group's neurons, its selection table and its optimal factor."""
    factors = context["factors"]
    rows = {f: np.array(results[factor_key(name, f)], dtype=float) for f in factors} if context["groups"][name] else {}
    return group_result(context["groups"][name], factors, rows, examples, np.array(context["baseline"], dtype=float),
                        seed)


def perplexity_table(context: dict, results: dict, optimal: dict | None) -> dict:
    """Pile perplexity at baseline and with the High Impact neurons ablated / amplified at each layer,
    amplified by the confirmed factor, else the selection-best one (marked unconfirmed)."""
    factor, source = steering_factor(optimal)
    print(f"\nPile perplexity ({context['pile_documents']['count']} documents), High Impact neurons at each layer"
          + ("" if factor is None else f"; amplified x{factor:g} ({source})") + ":")
    table = {"baseline": results[perplexity_key(None, None)], "neurons": context["groups"]["high_impact"],
             "factor": factor, "factor_source": source, "documents": context["pile_documents"], "layers": []}
    for layer in context["perplexity_layers"]:
        entry = {"layer": layer, "ablated": results[perplexity_key(layer, 0.0)]}
        if factor is not None:
            entry["amplified"] = results[perplexity_key(layer, factor)]
        table["layers"].append(entry)
        print(f"  layer {layer:>3}: ablated {entry['ablated']:.3f}"
              + (f", amplified x{factor:g} {entry['amplified']:.3f}" if factor is not None else ""))
    return table


def report(args, context: dict, results: dict, examples: list, started: float) -> None:
    """Factor tables, importance ranking, perplexity, the JSON and the plots, from the measured results."""
    comparison = Comparison(examples, np.array(context["baseline"], dtype=float), args.seed)
    base, layer = comparison.base, context["layer"]
    result = {"model": args.model, "layer": layer, "tasks": context["tasks"], "data_dir": context["data_dir"],
              "num_examples": args.num_examples, "step1_file": context["step1_file"],
              "baseline_accuracy": base["accuracy"], "per_task_baseline": base["per_task"],
              "chance_accuracy": summarize(examples, chance_correctness(examples))["accuracy"], "groups": {}}
    selection, confirmation = selection_split(examples)
    result["selection_examples"] = example_ids([examples[i] for i in selection])
    result["confirmation_examples"] = example_ids([examples[i] for i in confirmation])
    baseline = np.array(context["baseline"], dtype=float)
    result["selection_baseline_accuracy"] = summarize([examples[i] for i in selection], baseline[selection])["accuracy"]
    result["confirmation_baseline_accuracy"] = summarize([examples[i] for i in confirmation],
                                                         baseline[confirmation])["accuracy"]
    for name in context["groups"]:
        result["groups"][name] = group_table(name, context, results, examples, args.seed)
        print_group_table(name, result["groups"][name], layer)
    result["optimal_factors"] = {n: g.pop("optimal") for n, g in result["groups"].items()}

    ranked = context["ranked"]
    print(f"\nImportance ranking: {len(ranked)} neurons ablated one at a time on held-out examples")
    ablated = [np.array(results[f"neuron/{n}"], dtype=float) for n in ranked]
    result["importance_ranking"] = importance_ranking(context["step1_impacts"], ablated, ranked, comparison)
    rho = result["importance_ranking"]["spearman_step1_vs_heldout"]
    print(f"Spearman correlation of step-1 and held-out impacts: {'n/a' if rho is None else f'{rho:.3f}'}")

    if args.perplexity_ablation:
        if context["perplexity_layers"]:
            result["perplexity"] = perplexity_table(context, results, result["optimal_factors"].get("high_impact"))
        else:
            print("perplexity ablation skipped: the High Impact group is empty")
    result["engine"] = args.engine
    result["run"] = run_record(args, context["model_info"], started)
    path = write_json(Path(args.output_dir) / RESULTS_NAME, result)
    if not args.no_plots:
        from delta_steering.plots import plot_factors

        for plot in plot_factors(result, args.output_dir):
            print(f"plot: {plot}")
    print(f"results: {path}")


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    if args.num_examples < 2:
        raise UsageError(f"--num_examples must be at least 2 (a selection and a confirmation half), got "
                         f"{args.num_examples}")
    check_positive(args.max_neurons, "--max_neurons")
    check_positive(args.sample_neurons, "--sample_neurons")
    check_positive(args.chunk_neurons, "--chunk_neurons")
    factors = parse_float_list(args.factors)
    if any(f <= 0 for f in factors):
        raise UsageError("--factors must be positive (0 is ablation, which step 1 measures)")
    factors = [f for f in dict.fromkeys(factors) if f != 1]  # factor 1 is the baseline, always a candidate
    if not factors:
        raise UsageError("--factors names no steering factor other than 1 (the baseline)")
    workers = start_workers(args)
    if args.merge is not None:
        context, results = read_shards(args.merge, args.output_dir, STEP, fingerprint(args))
        examples = load_examples(context["tasks"], context["data_dir"], "heldout", args.num_examples)
        return report(args, context, results, examples, started)
    context, results, examples = measure(args, workers, factors)
    finish(args, workers, STEP, fingerprint(args), context, results,
           lambda: report(args, context, results, examples, started))

if __name__ == "__main__":
    main()
