"""Step 2: determine steering factors for the delta neurons found in step 1, on held-out examples.

    python step2_steering_factor_determination.py --neurons_file discovered_neurons.json
    python step2_steering_factor_determination.py --model models/mamba-tiny-demo --device cpu \\
        --neurons_file demo_results/discovered_neurons.json --perplexity_ablation --pile_path texts.txt

Amplifies step 1's groups, each as a whole, by each factor: High Impact (ablating the neuron alone
cost more than the step-1 file's high_impact_cut, 2 points by default) and Neutral (|impact| within
the cut). The held-out examples are split into a selection half, where each group's factor is
chosen (the baseline, factor 1, is a candidate), and a confirmation half, where the chosen factor's
gain is tested once; the summary gives the smallest gain that half can detect (80% power, alpha
0.05). Also re-measures single-neuron impacts on held-out examples (does the discovery replicate?),
and with --perplexity_ablation Pile perplexity with the High Impact neurons steered at each layer,
each change with a per-document bootstrap 95% CI.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np

import delta_steering as ds
from delta_steering.artifacts import STEP1_DEFAULTS
from delta_steering.cli import (DEFAULT_FACTORS, add_model_args, add_pile_args, add_run_args, add_sweep_args,
                                check_device, check_output_dir, check_positive, main_guard, parse_factors,
                                parse_int_list, parse_names, step_parser)

STEP = "step2"


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--num_examples", type=int, default=100,
                        help="held-out examples per task, split into selection and confirmation halves")
    parser.add_argument("--output_dir", default="cluster9_ablation_results",
                        help="results, plots and the resume checkpoint")
    parser.add_argument("--neurons_file", default=None,
                        help=f"step-1 JSON (default: {' or else '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--allow_model_mismatch", action="store_true",
                        help="use a step-1 file made with another model")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--transfer_layer", action="store_true",
                        help="steer the step-1 neurons at a --layer other than the one they were found at "
                             "(recorded in the results)")
    parser.add_argument("--tasks", default=None, help="default: the step-1 file's tasks")
    parser.add_argument("--data_dir", default=None, help="default: the step-1 file's data_dir")
    parser.add_argument("--factors", default=DEFAULT_FACTORS,
                        help="amplification factors tried on each group (factor 1, the baseline, always is)")
    parser.add_argument("--max_neurons", type=int, default=None, metavar="N",
                        help="importance ranking: re-measure on held-out examples only the N step-1 neurons of "
                             "largest |impact|, each ablated alone (default: every neuron step 1 measured)")
    parser.add_argument("--sample_neurons", type=int, default=None, metavar="N",
                        help="importance ranking: N step-1 neurons drawn at random (seeded) instead")
    add_sweep_args(parser)
    parser.add_argument("--perplexity_ablation", action="store_true",
                        help="Pile perplexity with the High Impact neurons ablated (x0) and amplified by the "
                             "group's factor at each layer, each change with a per-document bootstrap 95%% CI")
    parser.add_argument("--perplexity_layers", default=None, help="layers for --perplexity_ablation (default: all)")
    add_pile_args(parser)
    add_run_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    """The arguments, checked: everything that can be wrong without the model fails here."""
    args = build_parser().parse_args()
    if args.num_examples < 2:
        raise ds.UsageError(f"--num_examples must be at least 2 (a selection and a confirmation half), got "
                            f"{args.num_examples}")
    for flag in ("max_neurons", "sample_neurons", "chunk_neurons", "pile_samples"):
        check_positive(getattr(args, flag), f"--{flag}")
    args.factor_list = steering_factors(args.factors)
    check_device(args.device)
    check_output_dir(args.output_dir, "--output_dir")
    return args


def steering_factors(text: str) -> list[float]:
    """--factors as a list without factor 1 (the baseline, always a candidate)."""
    factors = [f for f in dict.fromkeys(parse_factors(text)) if f != 1]
    if not factors:
        raise ds.UsageError("--factors names no steering factor other than 1 (the baseline)")
    return factors


def perplexity_layers_of(args, shape) -> list[int]:
    """--perplexity_layers checked against the model's shape (None: every SSM layer)."""
    layers = parse_int_list(args.perplexity_layers, "perplexity_layers") or list(shape.ssm_layers)
    return [ds.model.sites.check_layer(shape, at, "--perplexity_layers") for at in layers]


def factor_key(group: str, factor: float) -> str:
    return f"factor/{group}/{factor!r}"


def perplexity_key(layer: int | None, factor: float | None) -> str:
    return f"perplexity/{layer}/{factor!r}"


def measure(args, run, model, tokenizer, step1, examples: list, layer: int, perplexity_layers: list[int]
            ) -> tuple[dict, dict]:
    """The context every process computes alike (baseline, groups, ranked neurons) and the results of
    this process's share of the work: a group amplified by a factor, a chunk of ranked neurons
    ablated one at a time, Pile perplexity with the High Impact neurons steered at one layer."""
    groups = step1.groups
    ablation = step1.ablation_of(range(ds.model.sites.num_delta_neurons(model)))
    ranked = ds.analysis.factors.ranked_neurons(step1.records, args.max_neurons, args.sample_neurons, args.seed)
    ds.model.steering.verify_steering_effect(model, [ds.Steering(layer, ds.Intervention.scale(neurons, args.factor_list[0]))
                                               for neurons in groups.values() if neurons][:1])
    if ranked:
        ds.model.steering.verify_steering_effect(model, ds.Steering(layer, ablation.only(ranked[:1])))
    encoded = ds.engine.scoring.encode_examples(tokenizer, examples)
    engine = ds.engine.sweep.engine_for(model, args.engine)

    def evaluate() -> list[float]:
        return ds.engine.scoring.evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded).tolist()

    def amplify(group: str, factor: float) -> dict:
        with ds.steer(model, layer, groups[group], factor):
            return {factor_key(group, factor): evaluate()}

    def ablate_each(chunk: list[int]) -> dict:
        rows = ds.engine.sweep.sweep_correctness(model, tokenizer, examples, layer, ablation.only(chunk), engine,
                                          args.batch_size, encoded, progress=True)
        return {f"neuron/{n}": row.tolist() for n, row in zip(chunk, rows)}

    def perplexity_at(at: int | None, factor: float | None) -> dict:
        with ds.steer(model, at, groups["high_impact"], factor) if at is not None else nullcontext():
            return {perplexity_key(at, factor): ds.engine.perplexity.document_losses(model, tokenizer, texts,
                                                                              batch_size=args.batch_size,
                                                                              progress=True)}

    baseline = ds.engine.scoring.evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded)
    base = ds.analysis.metrics.summarize(examples, baseline)
    if base["accuracy"] is None:
        raise ds.UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    print(f"Baseline accuracy {base['accuracy']:.2f}% on {len(examples)} held-out examples, layer {layer}")
    perplexity_layers = perplexity_layers if groups["high_impact"] else []
    texts = ds.data.pile.load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="evaluation") \
        if perplexity_layers else []
    context = {"layer": layer, "groups": groups, "high_impact_cut": step1.high_impact_cut, "factors": args.factor_list,
               "ranked": ranked, "step1_impacts": step1.records, "baseline": baseline.tolist(),
               "perplexity_layers": perplexity_layers, "engine": engine,
               "pile_documents": ds.data.pile.pile_record(texts, "evaluation"), "model_info": ds.model.loading.describe(model)}

    work = {factor_key(g, f): partial(amplify, g, f) for g, neurons in groups.items() if neurons
            for f in args.factor_list}
    work.update({f"neurons/{chunk[0]}-{chunk[-1]}": partial(ablate_each, chunk)
                 for chunk in ds.analysis.impacts.neuron_chunks(ranked, args.chunk_neurons)})
    if perplexity_layers:
        work[perplexity_key(None, None)] = partial(perplexity_at, None, None)
        work.update({perplexity_key(at, 0.0): partial(perplexity_at, at, 0.0) for at in perplexity_layers})
    results = run.map(work, "amplifying groups, ablating ranked neurons")
    if perplexity_layers:
        # the amplified perplexities need the High Impact factor: a slice computes (and checkpoints)
        # the factor results it lacks, the same computations as every other slice's
        missing = {factor_key("high_impact", f): partial(amplify, "high_impact", f) for f in args.factor_list
                   if factor_key("high_impact", f) not in results}
        if missing:
            results.update(run.map(missing, "High Impact factors for perplexity", shared=False))
        high_impact = group_table("high_impact", context, results, examples, args.seed)
        factor, _ = ds.artifacts.steering_factor(high_impact["optimal"])
        if factor is not None:
            amplified = {perplexity_key(at, factor): partial(perplexity_at, at, factor) for at in perplexity_layers}
            results.update(run.map(amplified, "perplexity with the optimal factor"))
    return context, results


def group_table(name: str, context: dict, results: dict, examples: list, seed: int) -> dict:
    """A group's neurons, its selection table and its optimal factor."""
    factors, neurons = context["factors"], context["groups"][name]
    rows = {f: np.array(results[factor_key(name, f)], dtype=float) for f in factors} if neurons else {}
    return ds.analysis.factors.group_result(neurons, factors, rows, examples, np.array(context["baseline"], dtype=float), seed)


def perplexity_table(context: dict, results: dict, optimal: dict | None, seed: int) -> dict:
    """Pile perplexity at baseline and with the High Impact neurons ablated / amplified at each layer,
    amplified by the confirmed factor, else the selection-best one (marked unconfirmed); each change
    from the baseline with its per-document paired bootstrap CI."""
    factor, source = ds.artifacts.steering_factor(optimal)
    base = results[perplexity_key(None, None)]
    table = {"baseline": ds.analysis.metrics.perplexity_of(base), "neurons": context["groups"]["high_impact"],
             "factor": factor, "factor_source": source, "documents": context["pile_documents"], "layers": []}
    print(f"\nPile perplexity ({context['pile_documents']['count']} documents, baseline {table['baseline']:.4f}), "
          "High Impact neurons steered at each layer; change from baseline, 95% CI over documents:")
    kinds = {"ablated": 0.0} if factor is None else {"ablated": 0.0, "amplified": factor}
    for layer in context["perplexity_layers"]:
        entry = {"layer": layer}
        for kind, k in kinds.items():
            losses = results[perplexity_key(layer, k)]
            entry[kind] = ds.analysis.metrics.perplexity_of(losses)
            entry[f"{kind}_change"] = ds.analysis.metrics.perplexity_change(base, losses, seed)
        table["layers"].append(entry)
        print(f"  layer {layer:>3}: " + "; ".join(
            ds.analysis.metrics.describe_change(f"{kind} x{k:g}", entry[kind], entry[f"{kind}_change"])
            for kind, k in kinds.items()))
    if factor is not None:
        print(f"  amplified by x{factor:g}: {ds.analysis.verification.FACTOR_SOURCES[source]}")
    return table


def report(args, context: dict, results: dict, examples: list, tasks: list[str], data_dir: str | None,
           started: float) -> "ds.artifacts.Factors":
    """Factor tables, optimal factors, importance ranking and perplexity, from the measured results:
    the step-2 file."""
    baseline = np.array(context["baseline"], dtype=float)
    base, layer = ds.analysis.metrics.summarize(examples, baseline), context["layer"]
    selection, confirmation = ds.analysis.factors.selection_split(examples)
    result = {"description": ds.analysis.factors.DESCRIPTION, "tasks": tasks, "data_dir": data_dir,
              "num_examples": args.num_examples, "high_impact_cut": context["high_impact_cut"],
              "baseline_accuracy": base["accuracy"], "per_task_baseline": base["per_task"],
              "chance_accuracy": ds.analysis.metrics.summarize(examples, ds.analysis.metrics.chance_correctness(examples))["accuracy"],
              "groups": {},
              "selection_examples": ds.data.tasks.example_ids([examples[i] for i in selection]),
              "confirmation_examples": ds.data.tasks.example_ids([examples[i] for i in confirmation]),
              "selection_baseline_accuracy": ds.analysis.metrics.summarize([examples[i] for i in selection],
                                                                  baseline[selection])["accuracy"],
              "confirmation_baseline_accuracy": ds.analysis.metrics.summarize([examples[i] for i in confirmation],
                                                                     baseline[confirmation])["accuracy"]}
    amplified = [results[factor_key(g, f)] for g, neurons in context["groups"].items() if neurons
                 for f in context["factors"]]
    limit = ds.analysis.factors.confirmation_limit(examples, baseline, amplified)
    result["minimum_detectable_effect"] = limit
    for name in context["groups"]:
        result["groups"][name] = group_table(name, context, results, examples, args.seed)
        ds.analysis.factors.print_group_table(name, result["groups"][name], layer, limit)
    print("\n" + ds.analysis.stats.describe_detection_limit(limit))
    result["optimal_factors"] = {n: g.pop("optimal") for n, g in result["groups"].items()}

    ranked = context["ranked"]
    print(f"\nImportance ranking: {len(ranked)} neurons ablated one at a time on held-out examples")
    ablated = [np.array(results[f"neuron/{n}"], dtype=float) for n in ranked]
    comparison = ds.analysis.metrics.Comparison(examples, baseline, args.seed)
    result["importance_ranking"] = ds.analysis.factors.importance_ranking(context["step1_impacts"], ablated, ranked, comparison)
    rho = result["importance_ranking"]["spearman_step1_vs_heldout"]
    print(f"Spearman correlation of step-1 and held-out impacts: {'n/a' if rho is None else f'{rho:.3f}'}")
    if args.perplexity_ablation:
        if context["perplexity_layers"]:
            result["perplexity"] = perplexity_table(context, results, result["optimal_factors"].get("high_impact"),
                                                    args.seed)
        else:
            print("perplexity ablation skipped: the High Impact group is empty")
    result["engine"] = context["engine"]
    result["run"] = ds.results_io.run_record(args, context["model_info"], started)
    groups, optimal = result.pop("groups"), result.pop("optimal_factors")
    return ds.artifacts.Factors(ds.artifacts.Provenance(**context["provenance"]), groups=groups, optimal=optimal,
                                report=result)


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    step1 = ds.artifacts.read_discovery(ds.artifacts.locate(args.neurons_file, STEP1_DEFAULTS, "step-1 file",
                                                            "--neurons_file"))
    layer = args.layer if args.layer is not None else step1.layer
    tasks = parse_names(args.tasks) if args.tasks else step1.tasks
    data_dir = args.data_dir or step1.data_dir
    merging = args.merge is not None
    if not merging:
        source = ds.model.loading.check_model_source(args.model, args.tokenizer)
        ds.model.sites.check_layer(source.shape, layer, "--layer" if args.layer is not None else f"{step1.what}: layer")
        transferred = {**step1.check_model(source, args.allow_model_mismatch),
                       **step1.check_layer(layer, args.transfer_layer)}
        step1.check_against(source.shape)
        ppl_layers = perplexity_layers_of(args, source.shape) if args.perplexity_ablation else []
    if args.pile_path and args.perplexity_ablation:
        ds.data.pile.local_files(args.pile_path)
    run = ds.distributed.StepRun(args, STEP, ds.distributed.fingerprint(args, step1_sha256=step1.sha256))
    examples = ds.data.tasks.load_examples(tasks, data_dir, "heldout", args.num_examples)
    if merging:
        context, results = run.merged()
    else:
        model, tokenizer = ds.model.loading.load_model(source, args.device, args.dtype, args.max_memory,
                                                       args.offload_folder)
        context, results = measure(args, run, model, tokenizer, step1, examples, layer, ppl_layers)
        context["provenance"] = ds.artifacts.Provenance.of(source, layer, {"step1_file": step1}, transferred).to_json()
    if run.publish(context, results):
        result = report(args, context, results, examples, tasks, data_dir, started).to_json()
        with run.saving():
            path = ds.results_io.write_json(Path(args.output_dir) / ds.artifacts.STEP2_NAME, result)
            if not args.no_plots:
                for plot in ds.analysis.plots.plot_factors(result, args.output_dir):
                    print(f"plot: {plot}")
        print(f"results: {path}")
    run.close()


if __name__ == "__main__":
    main()
