"""Step 3: verify delta-neuron steering on instruction following (IFEval) and Pile perplexity.

    python step3_steer_performance_verification.py                      # --combined
    python step3_steer_performance_verification.py --both --num_samples 50
    python step3_steer_performance_verification.py --score_responses responses.jsonl --ifeval_path input_data.jsonl

Sets: delta-sensitive (step 1's High Impact neurons), random and high-variance sets of the same
size; factor: step 2's optimal High Impact factor. --combined steers each set at the layer,
--cluster_ablation ablates each set, --layer_ablation steers the delta-sensitive set at each of
--layers, --both runs cluster and layer ablation. Every configuration is compared with the baseline.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from delta_steering.cli import (UsageError, add_model_args, add_pile_args, check_layer, check_neuron_ids,
                                check_positive, load_model, main_guard, parse_int_list)
from delta_steering.discovery import STEP1_DEFAULTS, load_discovery, locate
from delta_steering.factors import steering_factor as selection_factor
from delta_steering.distributed import Workers, add_distributed_args, finish, read_shards, start_workers
from delta_steering.ifeval import METRICS, load_ifeval_prompts, match_responses, score_responses
from delta_steering.results_io import file_digest, read_json, read_jsonl, run_record, write_json, write_jsonl
from delta_steering.steering import num_delta_neurons, num_layers, verify_steering_effect
from delta_steering.verification import (BASELINE, Configuration, Outcome, configurations, entry, neuron_sets,
                                         print_summary, response_rows, run_configuration)
from mamba_model_loader import describe
from pile_dataset_loader import load_pile_texts, pile_record

FACTORS_DEFAULT = "cluster9_ablation_results/cluster9_ablation_results_all_neurons.json"
OUTPUT_FILES = {"combined": "combined_steering_ifeval_results.json",
                "cluster_ablation": "cluster_ablation_ifeval_results.json",
                "layer_ablation": "layer_ablation_ifeval_results.json"}
STEP = "step3"
TITLES = {"combined": "Combined steering", "cluster_ablation": "Cluster ablation", "layer_ablation": "Layer ablation"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num_samples", type=int, default=100, help="first N IFEval prompts")
    parser.add_argument("--output_dir", default="cluster_ablation_ifeval_results",
                        help="results, responses, plots and the resume checkpoint")
    modes = parser.add_argument_group("modes (default --combined)")
    modes.add_argument("--combined", action="store_true", help="baseline and each set steered at the layer")
    modes.add_argument("--cluster_ablation", action="store_true", help="each set ablated")
    modes.add_argument("--layer_ablation", action="store_true", help="delta-sensitive steering at each of --layers")
    modes.add_argument("--both", action="store_true", help="--cluster_ablation and --layer_ablation")
    parser.add_argument("--neurons_file", default=None, help=f"step-1 JSON (default: {' or '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--factors_file", default=None, help=f"step-2 JSON (default: {FACTORS_DEFAULT})")
    parser.add_argument("--factor", type=float, default=None, help="steering factor (overrides the step-2 file)")
    parser.add_argument("--allow_model_mismatch", action="store_true")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--layers", default="18,19,20,21,22", help="layers for --layer_ablation")
    parser.add_argument("--ifeval_path", default=None, help="local IFEval JSONL (default: google/IFEval)")
    parser.add_argument("--ifeval_metric", default="prompt_level_strict_acc", choices=list(METRICS))
    parser.add_argument("--max_new_tokens", type=int, default=1280)
    add_pile_args(parser)
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--score_responses", default=None, metavar="FILE",
                        help='score a JSONL of {"prompt", "response"}; no model is loaded')
    add_distributed_args(parser)
    return parser.parse_args()


def chosen_modes(args) -> list[str]:
    if args.both:
        return ["cluster_ablation", "layer_ablation"]
    modes = [m for m in ("combined", "cluster_ablation", "layer_ablation") if getattr(args, m)]
    return modes or ["combined"]


def score_file(args) -> None:
    """--score_responses: the four IFEval metrics of a response file, printed and saved."""
    prompts = load_ifeval_prompts(args.ifeval_path)
    responses = match_responses(prompts, read_jsonl(args.score_responses, "response file"))
    scores = score_responses(prompts, responses)
    for name in METRICS:
        print(f"{name:>24}: {scores['metrics'][name]:.2f}")
    path = write_json(Path(args.output_dir) / f"{Path(args.score_responses).stem}_scores.json",
                      {"response_file": args.score_responses, "ifeval_path": args.ifeval_path, **scores})
    print(f"results: {path}")


def steering_factor(args) -> tuple[float, str]:
    """--factor ("command-line"), else step 2's High Impact factor: the confirmed one
    ("step2-confirmed"), or the selection-best one when the confirmation half did not confirm it
    ("step2-unconfirmed")."""
    if args.factor is not None:
        return args.factor, "command-line"
    path = locate(args.factors_file, (FACTORS_DEFAULT,), "step-2 file", "--factors_file (or --factor)")
    data = read_json(path, "step-2 file")
    optimal = data.get("optimal_factors", {}).get("high_impact") if isinstance(data, dict) else None
    factor, source = selection_factor(optimal if isinstance(optimal, dict) else None)
    if factor is None:
        raise UsageError(f"step-2 file {path} has no High Impact factor (optimal_factors.high_impact); "
                         "pass --factor")
    return factor, source


def model_layers(args, model, layer: int) -> list[int]:
    """--layers filtered to the model's range, with a warning for the others."""
    wanted = parse_int_list(args.layers, "layers")
    kept = [l for l in wanted if 0 <= l < num_layers(model)]
    if len(kept) < len(wanted):
        print(f"warning: --layers {sorted(set(wanted) - set(kept))} outside the model's layers 0-{num_layers(model) - 1}"
              " are skipped")
    if not kept:
        raise UsageError(f"--layers {args.layers}: none is a layer of this model (0-{num_layers(model) - 1})")
    return kept


def fingerprint(args) -> dict:
    """The arguments and input files that change results; batch size, device and the work split do not."""
    keys = ("model", "tokenizer", "dtype", "seed", "num_samples", "combined", "cluster_ablation", "layer_ablation",
            "both", "neurons_file", "factors_file", "factor", "allow_model_mismatch", "layer", "layers",
            "ifeval_path", "max_new_tokens", "pile_samples", "pile_path")
    step1_path = locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file", "--neurons_file")
    factors_path = None if args.factor is not None else \
        locate(args.factors_file, (FACTORS_DEFAULT,), "step-2 file", "--factors_file (or --factor)")
    return {**{k: getattr(args, k) for k in keys}, "step1_sha256": file_digest(step1_path),
            "step2_sha256": factors_path and file_digest(factors_path)}


def measure(args, workers: Workers) -> tuple[dict, dict]:
    """What every process computes alike (sets, factor, layers) and the outcomes of this process's
    share of the configurations, each run once even when several modes use it (the baseline)."""
    step1_path = locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file", "--neurons_file")
    factor, factor_source = steering_factor(args)
    prompts = load_ifeval_prompts(args.ifeval_path, args.num_samples)
    model, tokenizer = load_model(args)
    step1 = load_discovery(step1_path, model, args.model, args.allow_model_mismatch)
    layer = check_layer(model, args.layer if args.layer is not None else step1.get("layer", 20))
    modes = chosen_modes(args)
    layers = model_layers(args, model, layer) if "layer_ablation" in modes else []
    sets, warnings = neuron_sets(step1, num_delta_neurons(model), args.seed)
    for warning in warnings:
        print(f"warning: {warning}")
    check_neuron_ids(model, sets["delta_sensitive"], "step-1 neurons")
    verify_steering_effect(model, layer, sets["delta_sensitive"])
    texts = load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="evaluation")
    if factor_source == "step2-unconfirmed":
        print(f"warning: step 2 did not confirm a High Impact factor; steering with its selection-best factor "
              f"x{factor:g}, unconfirmed")
    print(f"{len(prompts)} IFEval prompts, {len(texts)} Pile documents; factor {factor:g} ({factor_source}); "
          f"delta-sensitive set of {len(sets['delta_sensitive'])} neurons at layer {layer}")
    context = {"modes": modes, "layer": layer, "layers": layers, "factor": factor, "factor_source": factor_source,
               "step1_file": str(step1_path), "sets": sets, "num_prompts": len(prompts),
               "pile_documents": pile_record(texts, "evaluation"), "model_info": describe(model)}

    def run(configuration) -> dict:
        print(f"\n[{configuration.name}] {configuration.description}")
        outcome = run_configuration(model, tokenizer, configuration, prompts, texts, args.max_new_tokens,
                                    args.batch_size)
        return {configuration.name: asdict(outcome)}

    checkpoint = workers.checkpoint(args, STEP, fingerprint(args))
    return context, workers.run(list(planned(context).values()), run, checkpoint=checkpoint)


def planned(context: dict, mode: str | None = None) -> dict[str, Configuration]:
    """The configurations of one mode, or of all the run's modes, by name, baseline first."""
    modes = [mode] if mode else context["modes"]
    return {c.name: c for m in modes
            for c in configurations(m, context["sets"], context["layer"], context["layers"], context["factor"])}


def report(args, context: dict, outcomes: dict, started: float) -> None:
    """Per mode: the entries compared with the baseline, the JSON, the responses, the table; then plots."""
    output_dir = Path(args.output_dir)
    common = {"model": args.model, **{k: context[k] for k in ("layer", "factor", "factor_source", "step1_file",
                                                               "sets")},
              "ifeval_metric": args.ifeval_metric, "num_prompts": context["num_prompts"],
              "pile_documents": context["pile_documents"]}
    outcomes = {name: Outcome(**record) for name, record in outcomes.items()}
    results = {}
    for mode in context["modes"]:
        chosen = planned(context, mode)
        entries = [entry(c, outcomes[name], outcomes[BASELINE.name], args.ifeval_metric, args.seed)
                   for name, c in chosen.items()]
        for name in chosen:
            write_jsonl(output_dir / f"responses_{name}.jsonl", response_rows(outcomes[name]))
        results[mode] = {**common, "mode": mode, "configurations": entries,
                         "run": run_record(args, context["model_info"], started)}
        path = write_json(output_dir / OUTPUT_FILES[mode], results[mode])
        print_summary(TITLES[mode], entries, args.ifeval_metric, context["factor"], context["factor_source"])
        print(f"results: {path}")
    if not args.no_plots:
        from delta_steering.plots import plot_verification

        for plot in plot_verification(results, output_dir):
            print(f"plot: {plot}")


@main_guard
def main() -> None:
    args = parse_args()
    if args.score_responses:
        return score_file(args)
    started = time.time()
    check_positive(args.num_samples, "--num_samples")
    check_positive(args.max_new_tokens, "--max_new_tokens")
    workers = start_workers(args)
    if args.merge is not None:
        context, outcomes = read_shards(args.merge, args.output_dir, STEP, fingerprint(args))
        return report(args, context, outcomes, started)
    context, outcomes = measure(args, workers)
    finish(args, workers, STEP, fingerprint(args), context, outcomes, lambda: report(args, context, outcomes, started))

if __name__ == "__main__":
    main()
