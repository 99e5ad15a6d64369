"""Step 3: verify delta-neuron steering on instruction following (IFEval) and Pile perplexity.

    python step3_steer_performance_verification.py                      # --combined
    python step3_steer_performance_verification.py --both --num_samples 50
    python step3_steer_performance_verification.py --score_responses responses.jsonl --ifeval_path input_data.jsonl

Sets: delta-sensitive (step 1's High Impact neurons), random and high-variance sets of the same
size; factor: --factor, else step 2's High Impact factor (confirmed, or marked unconfirmed); the
summary's first line says which and why. The modes keep the original study's names:
--combined amplifies each set by the factor at the layer, --cluster_ablation ablates each set,
--layer_ablation amplifies the delta-sensitive set by the factor at each of --layers (an
amplification, despite its name), --both runs cluster and layer ablation. Every configuration is
compared with the baseline on the same prompts (the summary gives the smallest Δ they can detect)
and Pile documents (each perplexity change with a per-document bootstrap 95% CI).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import delta_steering as ds
from delta_steering.artifacts import STEP1_DEFAULTS, STEP2_DEFAULTS
from delta_steering.cli import (add_model_args, add_pile_args, add_run_args, check_device, check_output_dir,
                                check_positive, main_guard, parse_int_list, step_parser)
from delta_steering.intervention import check_factor
from delta_steering.data.ifeval import METRICS

STEP = "step3"
OUTPUT_FILES = {"combined": "combined_steering_ifeval_results.json",
                "cluster_ablation": "cluster_ablation_ifeval_results.json",
                "layer_ablation": "layer_ablation_ifeval_results.json"}


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--num_samples", type=int, default=100, help="the first N IFEval prompts")
    parser.add_argument("--output_dir", default="cluster_ablation_ifeval_results",
                        help="results, responses, plots and the resume checkpoint")
    modes = parser.add_argument_group("modes (--combined when none is given)")
    modes.add_argument("--combined", action="store_true", help="each set amplified by the factor at the layer")
    modes.add_argument("--cluster_ablation", action="store_true",
                       help="each set ablated at the layer (as step 1 ablated single neurons)")
    modes.add_argument("--layer_ablation", action="store_true",
                       help="the delta-sensitive set amplified by the factor at each of --layers (the original "
                            "study's name; nothing is ablated)")
    modes.add_argument("--both", action="store_true", help="--cluster_ablation and --layer_ablation, not --combined")
    parser.add_argument("--neurons_file", default=None,
                        help=f"step-1 JSON (default: {' or else '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--factors_file", default=None, help=f"step-2 JSON (default: {STEP2_DEFAULTS[0]})")
    parser.add_argument("--factor", type=float, default=None, help="steering factor (default: the step-2 file's)")
    parser.add_argument("--allow_model_mismatch", action="store_true",
                        help="use step files made with another model")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--transfer_layer", action="store_true",
                        help="steer the step-1 neurons at a --layer other than the one they were found at "
                             "(recorded in the results)")
    parser.add_argument("--layers", default=None,
                        help="layers for --layer_ablation (default: the 5 SSM layers centred on the layer, "
                             "18-22 for layer 20 of a 24-layer model)")
    parser.add_argument("--ifeval_path", default=None, help="local IFEval JSONL (default: google/IFEval on the Hub)")
    parser.add_argument("--ifeval_metric", default="prompt_level_strict_acc", choices=list(METRICS),
                        help="the metric reported as Accuracy")
    parser.add_argument("--max_new_tokens", type=int, default=1280, help="generation length limit per prompt")
    add_pile_args(parser)
    parser.add_argument("--score_responses", default=None, metavar="FILE",
                        help='score a JSONL of {"prompt", "response"}; no model is loaded')
    add_run_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    """The arguments, checked: everything that can be wrong without the model fails here."""
    args = build_parser().parse_args()
    for flag in ("num_samples", "max_new_tokens", "pile_samples"):
        check_positive(getattr(args, flag), f"--{flag}")
    if args.factor is not None and check_factor(args.factor, "--factor") == 1:
        raise ds.UsageError("--factor 1 is no steering: every configuration would equal the baseline")
    check_device(args.device)
    check_output_dir(args.output_dir, "--output_dir")
    return args


def chosen_modes(args) -> list[str]:
    if args.both:
        return ["cluster_ablation", "layer_ablation"]
    return [m for m in ds.analysis.verification.MODES if getattr(args, m)] or ["combined"]


def score_file(args) -> None:
    """--score_responses: the four IFEval metrics of a response file, printed and saved."""
    prompts = ds.data.ifeval.load_ifeval_prompts(args.ifeval_path)
    responses = ds.data.ifeval.match_responses(prompts, ds.results_io.read_jsonl(args.score_responses, "response file"))
    scores = ds.data.ifeval.score_responses(prompts, responses)
    for name in METRICS:
        print(f"{name:>24}: {scores['metrics'][name]:.2f}")
    path = ds.results_io.write_json(Path(args.output_dir) / f"{Path(args.score_responses).stem}_scores.json",
                                    {"response_file": args.score_responses, "ifeval_path": args.ifeval_path, **scores})
    print(f"results: {path}")


def model_layers(args, shape, layer: int, warn: bool = False) -> list[int]:
    """--layers filtered to the model's SSM layers (with a warning for the others when `warn`); by
    default the SSM layers around `layer`: two before, itself, two after."""
    if args.layers is None:
        at = shape.ssm_layers.index(layer)
        return list(shape.ssm_layers[max(0, at - 2): at + 3])
    wanted = parse_int_list(args.layers, "layers")
    kept = [at for at in wanted if at in shape.ssm_layers]
    if not kept:
        raise ds.UsageError(f"--layers {args.layers}: none is a layer of this model (0-{shape.num_layers - 1})")
    if warn and len(kept) < len(wanted):
        print(f"warning: --layers {sorted(set(wanted) - set(kept))} are not layers of the model "
              f"(0-{shape.num_layers - 1}) and are skipped")
    return kept


def check_inputs(args, source, step1, step2, layer: int) -> dict:
    """The step files against this run and each other, and the arguments against the model's config,
    before the model loads; returns the deliberate transfers to record."""
    ds.model.sites.check_layer(source.shape, layer, "--layer" if args.layer is not None else f"{step1.what}: layer")
    transferred = {**step1.check_model(source, args.allow_model_mismatch),
                   **step1.check_layer(layer, args.transfer_layer)}
    if step2 is not None:
        step2.check_model(source, args.allow_model_mismatch)
        step2.check_input("step1_file", step1)
        transferred.update(step2.check_layer(layer, args.transfer_layer))
    step1.check_against(source.shape)
    if "layer_ablation" in chosen_modes(args):
        model_layers(args, source.shape, layer)
    return transferred


def steering_factor(args, step2) -> tuple[float, str, str]:
    """--factor ("command-line"), else step 2's High Impact factor: the confirmed one
    ("step2-confirmed") or the selection-best one ("step2-unconfirmed"); and the factor's standing
    in one line."""
    if step2 is None:
        return args.factor, "command-line", ds.analysis.verification.factor_standing(args.factor, "command-line", None)
    factor, source = step2.steering_factor("high_impact")
    if factor is None:
        raise ds.UsageError(f"{step2.what} has no High Impact factor (optimal_factors.high_impact); pass --factor")
    return factor, source, ds.analysis.verification.factor_standing(factor, source, step2.optimal.get("high_impact"))


def measure(args, run, model, tokenizer, step1, prompts: list[dict], layer: int, factor: float, factor_source: str,
            standing: str) -> tuple[dict, dict]:
    """What every process computes alike (sets, layers) and the outcomes of this process's share of
    the configurations, each run once even when several modes use it (the baseline)."""
    shape = ds.model.sites.shape_of(model)
    modes = chosen_modes(args)
    layers = model_layers(args, shape, layer, warn=True) if "layer_ablation" in modes else []
    sets, warnings = ds.analysis.verification.neuron_sets(step1, shape.delta_neurons, args.seed)
    for warning in warnings:
        print(f"warning: {warning}")
    texts = ds.data.pile.load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="evaluation")
    print(f"{standing}\n{len(prompts)} IFEval prompts, {len(texts)} Pile documents; delta-sensitive set of "
          f"{len(sets['delta_sensitive'])} neurons at layer {layer}")
    context = {"modes": modes, "layer": layer, "layers": layers, "factor": factor, "factor_source": factor_source,
               "factor_standing": standing, "ablation": step1.ablation, "sets": sets, "num_prompts": len(prompts),
               "pile_documents": ds.data.pile.pile_record(texts, "evaluation"), "model_info": ds.model.loading.describe(model)}
    configurations = planned(context, step1.dt_pre_mean)
    ds.model.steering.verify_steering_effect(model, [c for c in configurations.values() if c.neurons][:1])

    def outcome(name: str, steering: ds.Steering) -> dict:
        print(f"\n[{name}] {ds.analysis.verification.configuration_description(name, steering)}")
        result = ds.steps.verify.run_configuration(model, tokenizer, steering, prompts, texts, args.max_new_tokens,
                                                   args.batch_size)
        return {name: asdict(result)}

    work = {name: partial(outcome, name, c) for name, c in configurations.items()}
    return context, run.map(work, "configurations", unit="configuration")


def planned(context: dict, dt_pre_mean: list[float], mode: str | None = None) -> dict:
    """The configurations of one mode, or of all the run's modes, by name, baseline first."""
    modes = [mode] if mode else context["modes"]
    return {name: c for m in modes
            for name, c in ds.analysis.verification.configurations(m, context["sets"], context["layer"], context["layers"],
                                                          context["factor"], context["ablation"], dt_pre_mean).items()}


def report(args, context: dict, outcomes: dict, dt_pre_mean: list[float], started: float
           ) -> dict[str, "ds.artifacts.Results"]:
    """Per mode: the configurations compared with the baseline, the table; the results by mode."""
    common = {**{k: context[k] for k in ("factor", "factor_source", "factor_standing", "sets")},
              "ifeval_metric": args.ifeval_metric, "num_prompts": context["num_prompts"],
              "pile_documents": context["pile_documents"]}
    outcomes = {name: ds.analysis.verification.Outcome(**record) for name, record in outcomes.items()}
    results = {}
    print(f"\n{context['factor_standing']}")
    for mode in context["modes"]:
        chosen = planned(context, dt_pre_mean, mode)
        entries = [ds.analysis.verification.entry(name, c, outcomes[name], outcomes["baseline"], args.ifeval_metric, args.seed)
                   for name, c in chosen.items()]
        limit = ds.analysis.verification.prompt_limit([outcomes[name] for name in chosen if name != "baseline"],
                                             outcomes["baseline"], args.ifeval_metric)
        title = ds.analysis.verification.mode_title(mode, context["factor"], context["layer"], context["layers"],
                                           context["ablation"])
        results[mode] = ds.artifacts.Results(
            ds.artifacts.Provenance(**context["provenance"]), step=STEP,
            report={**common, "mode": mode, "mode_title": title,
                    "description": f"{title}. {ds.analysis.verification.DESCRIPTION}", "configurations": entries,
                    "minimum_detectable_effect": limit,
                    "run": ds.results_io.run_record(args, context["model_info"], started)})
        ds.analysis.verification.print_summary(title, entries, args.ifeval_metric, context["factor"],
                                      context["factor_source"], limit)
    return results


def save(args, results: dict, outcomes: dict) -> None:
    """Each mode's JSON, every configuration's responses, the plots."""
    output_dir = Path(args.output_dir)
    records = {mode: result.to_json() for mode, result in results.items()}
    for mode, record in records.items():
        for entry in record["configurations"]:
            rows = ds.analysis.verification.response_rows(ds.analysis.verification.Outcome(**outcomes[entry["name"]]))
            ds.results_io.write_jsonl(output_dir / f"responses_{entry['name']}.jsonl", rows)
        print(f"results: {ds.results_io.write_json(output_dir / OUTPUT_FILES[mode], record)}")
    if not args.no_plots:
        for plot in ds.analysis.plots.plot_verification(records, output_dir):
            print(f"plot: {plot}")


@main_guard
def main() -> None:
    args = parse_args()
    if args.score_responses:
        return score_file(args)
    started = time.time()
    step1 = ds.artifacts.read_discovery(ds.artifacts.locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file",
                                                            "--neurons_file"))
    step2 = None if args.factor is not None else ds.artifacts.read_factors(
        ds.artifacts.locate(args.factors_file, STEP2_DEFAULTS, "step-2 file", "--factors_file (or --factor)"))
    layer = args.layer if args.layer is not None else step1.layer
    factor, factor_source, standing = steering_factor(args, step2)
    merging = args.merge is not None
    if not merging:
        source = ds.model.loading.check_model_source(args.model, args.tokenizer)
        transferred = check_inputs(args, source, step1, step2, layer)
    if args.pile_path:
        ds.data.pile.local_files(args.pile_path)
    run = ds.distributed.StepRun(args, STEP, ds.distributed.fingerprint(
        args, step1_sha256=step1.sha256, step2_sha256=step2.sha256 if step2 else None))
    prompts = ds.data.ifeval.load_ifeval_prompts(args.ifeval_path, args.num_samples)
    if merging:
        context, outcomes = run.merged()
    else:
        model, tokenizer = ds.model.loading.load_model(source, args.device, args.dtype, args.max_memory,
                                                       args.offload_folder)
        context, outcomes = measure(args, run, model, tokenizer, step1, prompts, layer, factor,
                                       factor_source, standing)
        inputs = {"step1_file": step1, **({"step2_file": step2} if step2 else {})}
        context["provenance"] = ds.artifacts.Provenance.of(source, layer, inputs, transferred).to_json()
    if run.publish(context, outcomes):
        results = report(args, context, outcomes, step1.dt_pre_mean, started)
        with run.saving():
            save(args, results, outcomes)
    run.close()


if __name__ == "__main__":
    main()
