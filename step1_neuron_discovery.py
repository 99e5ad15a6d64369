"""Step 1: discover which delta neurons of a Mamba layer matter, by ablating each one on its own.

A delta neuron is one channel i of a Mamba layer's SSM time-step projection, dt_pre = dt_proj(...),
whose softplus is the channel's step Δ: how fast its state forgets and takes in each token.

    python step1_neuron_discovery.py --save_path discovered_neurons.json
    python step1_neuron_discovery.py --model models/mamba-tiny-demo --device cpu \\
        --tasks models/mamba-tiny-demo/demo_data/copying.jsonl --save_path out.json --neurons 0-31

Baseline accuracy on the discovery examples, per-neuron delta variance on Pile texts, then every
neuron in --neurons ablated alone: impact = baseline - ablated accuracy (points; positive = the
neuron helps), with a paired bootstrap 95% CI, an exact sign-test p-value and BH q-values. The
groups step 2 amplifies: High Impact (impact > --high_impact_cut points, 2 by default) and Neutral
(|impact| <= the cut); the cut is a size, not a significance test. The summary ends with the
smallest impact this run can detect (80% power, alpha 0.05).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

import delta_steering as ds
from delta_steering.cli import (add_discovery_args, add_model_args, add_pile_args, add_run_args, add_sweep_args,
                                check_discovery_args, main_guard, parse_int_list, parse_names, step_parser)

STEP = "step1"


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    add_discovery_args(parser, "discovery", "ablation_3_results", "plots")
    parser.add_argument("--layer", type=int, default=20, help="the layer whose delta neurons are ablated")
    parser.add_argument("--threshold", type=float, default=-2.0,
                        help="the original study's beneficial list: impact >= THRESHOLD points (at -2 nearly every "
                             "neuron passes); it does not make the groups")
    parser.add_argument("--high_impact_cut", type=float, default=ds.artifacts.HIGH_IMPACT, metavar="POINTS",
                        help="High Impact group: impact > POINTS; Neutral group: |impact| <= POINTS (a size, not a "
                             "significance test)")
    parser.add_argument("--neurons", default=None, help="ids and ranges, e.g. 0-127 (default: all)")
    add_sweep_args(parser)
    parser.add_argument("--method", default="exact", choices=["exact", "attribution"],
                        help="attribution: first-order estimates of every neuron, then --verify_top re-measured exactly")
    parser.add_argument("--verify_top", type=int, default=50, help="neurons re-measured exactly after attribution")
    add_pile_args(parser)
    add_run_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    """The arguments, checked: everything that can be wrong without the model fails here."""
    args = build_parser().parse_args()
    if not args.high_impact_cut >= 0:
        raise ds.UsageError(f"--high_impact_cut must be 0 or more points, got {args.high_impact_cut}")
    check_discovery_args(args)
    return args


def requested_neurons(args, shape) -> list[int]:
    """--neurons checked against the model's shape (all delta neurons when not given); --layer too."""
    ds.model.sites.check_layer(shape, args.layer, "--layer")
    requested = parse_int_list(args.neurons)
    return ds.model.sites.check_neurons(shape, requested, "--neurons") if requested else list(range(shape.delta_neurons))


def measure(args, run, model, tokenizer, neurons: list[int], examples) -> tuple[dict, dict]:
    """What every process computes alike (baseline, delta statistics, attribution screen) and the
    correctness rows of its share of the neurons (under torchrun, all of them)."""
    layer, n_delta = args.layer, ds.model.sites.num_delta_neurons(model)
    timings = {}

    t = time.time()
    texts = ds.data.pile.load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="statistics")
    stats = ds.model.delta_stats.delta_statistics(model, tokenizer, texts, layer)
    timings["delta_statistics"] = round(time.time() - t, 2)
    ablation = ds.Intervention.ablation(args.ablation, range(n_delta), [float(v) for v in stats["dt_pre_mean"]])
    ds.model.steering.verify_steering_effect(model, ds.Steering(layer, ablation.only(neurons[:1])))

    encoded = ds.engine.scoring.encode_examples(tokenizer, examples)
    t = time.time()
    baseline = ds.engine.scoring.evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded)
    timings["baseline"] = round(time.time() - t, 2)
    print_baseline(examples, baseline, layer)

    engine = ds.engine.sweep.engine_for(model, args.engine)
    screened = {"requested_neurons": neurons}
    if args.method == "attribution" and not ds.engine.attribution.covers(model):
        print(f"note: attribution covers {', '.join(ds.engine.attribution.FAMILIES)} models; every neuron of --neurons is "
              "measured exactly instead")
    elif args.method == "attribution":
        t = time.time()
        estimates, neurons = ds.engine.attribution.attribution_screen(model, tokenizer, examples, encoded, layer, neurons,
                                                             ablation, args.batch_size, args.verify_top)
        timings["attribution"] = round(time.time() - t, 2)
        screened.update(attribution_estimates=estimates, verified_neurons=neurons)

    def ablate_each(chunk: list[int]) -> dict:
        rows = ds.engine.sweep.sweep_correctness(model, tokenizer, examples, layer, ablation.only(chunk), engine,
                                          args.batch_size, encoded, progress=True)
        return {str(n): row.tolist() for n, row in zip(chunk, rows)}

    work = {f"neurons/{chunk[0]}-{chunk[-1]}": partial(ablate_each, chunk)
            for chunk in ds.analysis.impacts.neuron_chunks(neurons, args.chunk_neurons)}
    t = time.time()
    rows = run.map(work, f"ablating layer {layer}, {args.chunk_neurons} neurons a chunk", unit="chunk")
    timings["sweep"] = round(time.time() - t, 2)
    context = {"layer": layer, "neurons": neurons, "baseline": baseline.tolist(), "screened": screened,
               "engine": engine,
               "delta_statistics": {"delta_variance": stats["delta_variance"].tolist(),
                                    "dt_pre_mean": [float(v) for v in stats["dt_pre_mean"]],
                                    "num_tokens": int(stats["num_tokens"]),
                                    "documents": ds.data.pile.pile_record(texts, "statistics")},
               "model_info": ds.model.loading.describe(model), "timings": timings}
    return context, rows


def print_baseline(examples, baseline: np.ndarray, layer: int) -> None:
    base = ds.analysis.metrics.summarize(examples, baseline)
    if base["accuracy"] is None:
        raise ds.UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    chance = ds.analysis.metrics.summarize(examples, ds.analysis.metrics.chance_correctness(examples))
    print(f"Baseline accuracy {base['accuracy']:.2f}% (chance {chance['accuracy']:.2f}%) on {len(examples)} "
          f"discovery examples (layer {layer})")
    for name, value in base["per_task"].items():
        print(f"  {name:>24}: {value:6.2f}%  (chance {chance['per_task'][name]:5.2f}%, "
              f"{sum(e.task == name for e in examples)} examples)")


def report(args, context: dict, rows: dict, examples: list, started: float) -> "ds.artifacts.Discovery":
    """Impacts, statistics and the console summary, from the measured rows: the step-1 file's contents."""
    neurons, baseline = context["neurons"], np.array(context["baseline"], dtype=float)
    ablated = np.array([rows[str(n)] for n in neurons], dtype=float)
    stats = context["delta_statistics"]
    screened = dict(context["screened"])
    unmeasured = sorted(set(screened.pop("requested_neurons")) - set(neurons))
    records = ds.analysis.impacts.neuron_impacts(examples, baseline, ablated, neurons, stats["delta_variance"], args.seed,
                                          unmeasured)
    screened["minimum_detectable_effect"] = ds.analysis.stats.detection_limit(
        baseline, list(ablated), ds.analysis.metrics.example_weights(examples), "a neuron ablated vs the baseline")
    if "attribution_estimates" in screened:
        screened.update(ds.analysis.impacts.attach_estimates(records, screened["attribution_estimates"]))
        rhos = [screened[k] for k in ("spearman_estimated_impact", "spearman_margin_loss")]
        shown = ["n/a" if r is None else f"{r:.3f}" for r in rhos]
        print(f"attribution vs exact impact on {len(neurons)} verified neurons: Spearman {shown[0]} "
              f"(estimated impact), {shown[1]} (estimated margin loss)")
    provenance = ds.artifacts.Provenance(**context["provenance"])
    discovery = ds.analysis.impacts.discovery_result(
        examples, baseline, records, args.threshold, provenance, parse_names(args.tasks), args.validation_size, stats,
        data_dir=args.data_dir, ablation=args.ablation, high_impact_cut=args.high_impact_cut,
        engine=context["engine"], method=args.method, neurons_tested=len(neurons) + len(unmeasured), **screened,
        run=ds.results_io.run_record(args, context["model_info"], started, timings=context["timings"]))
    ds.analysis.impacts.print_summary(discovery.to_json())
    return discovery


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    run = ds.distributed.StepRun(args, STEP, ds.distributed.fingerprint(args))
    source = None if run.merging else ds.model.loading.check_model_source(args.model, args.tokenizer)
    neurons = requested_neurons(args, source.shape) if source is not None else None
    if args.pile_path:
        ds.data.pile.local_files(args.pile_path)
    examples = ds.data.tasks.load_examples(parse_names(args.tasks), args.data_dir, "discovery", args.validation_size)
    if run.merging:
        context, rows = run.merged()
    else:
        model, tokenizer = ds.model.loading.load_model(source, args.device, args.dtype, args.max_memory,
                                                       args.offload_folder)
        context, rows = measure(args, run, model, tokenizer, neurons, examples)
        context["provenance"] = ds.artifacts.Provenance.of(source, args.layer).to_json()
    if run.publish(context, rows):
        result = report(args, context, rows, examples, started).to_json()
        with run.saving():
            ds.results_io.write_json(args.save_path, result)
            if not args.no_plots:
                for path in ds.analysis.plots.plot_discovery(result, args.output_dir):
                    print(f"plot: {path}")
        print(f"results: {args.save_path}")
    run.close()


if __name__ == "__main__":
    main()
