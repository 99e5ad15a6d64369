"""The delta atlas: which layer's delta neurons matter, every SSM layer at once.

    python delta_atlas.py --save_path atlas.json
    python delta_atlas.py --model models/mamba-tiny-demo --device cpu \\
        --tasks models/mamba-tiny-demo/demo_data/copying.jsonl --save_path atlas.json --verify_top 5 \\
        --step1_layer 3 --save_step1 step1_layer3.json

Every delta neuron of every SSM layer (or of --layers) ablated alone, estimated to first order by
attribution from one forward and one backward pass per batch; the --verify_top neurons of each layer
with the largest estimated impact re-measured exactly (impact = baseline - ablated accuracy, points,
with a paired bootstrap 95% CI and an exact sign test); Benjamini-Hochberg over every neuron of every
layer, unmeasured ones as p = 1. --step1_layer L --save_step1 PATH also writes layer L as a step-1
file that step 2 reads. Attribution covers the Mamba-1 families (mamba, falcon_mamba).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from functools import partial

import numpy as np

import delta_steering as ds
from delta_steering.cli import (add_discovery_args, add_model_args, add_pile_args, add_run_args, add_sweep_args,
                                check_discovery_args, check_output_file, main_guard, parse_int_list, parse_names,
                                step_parser)

STEP = "atlas"


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    add_discovery_args(parser, "atlas", "atlas_results", "the figure")
    parser.add_argument("--layers", default=None, help="SSM layers, ids and ranges, e.g. 16-23 (default: all)")
    parser.add_argument("--verify_top", type=int, default=20, help="neurons of each layer re-measured exactly")
    parser.add_argument("--threshold", type=float, default=-2.0,
                        help="beneficial neurons of the --save_step1 file: impact >= threshold (points)")
    parser.add_argument("--step1_layer", type=int, default=None, help="the layer --save_step1 writes")
    parser.add_argument("--save_step1", default=None, help="write --step1_layer as a step-1 file for step 2")
    add_sweep_args(parser)
    add_pile_args(parser)
    add_run_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    """The arguments, checked: everything that can be wrong without the model fails here."""
    args = build_parser().parse_args()
    if (args.step1_layer is None) != (args.save_step1 is None):
        raise ds.UsageError("--step1_layer and --save_step1 go together: the layer, and where its step-1 file goes")
    check_discovery_args(args)
    if args.save_step1:
        check_output_file(args.save_step1, "--save_step1")
    return args


def atlas_layers(args, shape) -> list[int]:
    """--layers (default: every SSM layer) and --step1_layer, checked against the model's shape."""
    requested = parse_int_list(args.layers, "layers") or list(shape.ssm_layers)
    layers = [ds.model.sites.check_layer(shape, layer, "--layers") for layer in requested]
    if args.step1_layer is not None and args.step1_layer not in layers:
        raise ds.UsageError(f"--step1_layer {args.step1_layer} is not among the atlas's layers "
                            f"({ds.model.loading.compact_ranges(layers)})")
    return layers


def check_family(source) -> None:
    family = ds.model.sites.family_of(source.model_config).name
    if family not in ds.engine.attribution.FAMILIES:
        raise ds.UsageError(f"the atlas needs attribution, which covers {', '.join(ds.engine.attribution.FAMILIES)} models, "
                            f"not {family}; run step 1 per layer instead")


def measure(args, run, model, tokenizer, layers: list[int], examples) -> tuple[dict, dict]:
    """What every process computes alike (baseline, delta statistics, the attribution pass) and the
    correctness rows of its share of the verified neurons."""
    n = ds.model.sites.num_delta_neurons(model)
    timings = {}

    t = time.time()
    texts = ds.data.pile.load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="statistics")
    stats = ds.model.delta_stats.layer_delta_statistics(model, tokenizer, texts, layers)
    timings["delta_statistics"] = round(time.time() - t, 2)
    ablations = {layer: ds.Intervention.ablation(args.ablation, range(n), [float(v) for v in stats[layer]["dt_pre_mean"]])
                 for layer in layers}
    ds.model.steering.verify_steering_effect(model, ds.Steering(layers[0], ablations[layers[0]].only([0])))

    encoded = ds.engine.scoring.encode_examples(tokenizer, examples)
    t = time.time()
    baseline = ds.engine.scoring.evaluate(model, tokenizer, examples, args.batch_size, progress=True, encoded=encoded)
    timings["baseline"] = round(time.time() - t, 2)
    if ds.analysis.metrics.summarize(examples, baseline)["accuracy"] is None:
        raise ds.UsageError("the baseline has non-finite logits; try --dtype float32")

    t = time.time()
    estimates = ds.engine.attribution.atlas_estimates(model, tokenizer, examples, encoded, ablations, args.batch_size, progress=True)
    timings["attribution"] = round(time.time() - t, 2)
    verified = {layer: ds.analysis.impacts.top_estimated(estimates[layer], args.verify_top) for layer in layers}

    engine = ds.engine.sweep.engine_for(model, args.engine)

    def ablate_each(layer: int, chunk: list[int]) -> dict:
        rows = ds.engine.sweep.sweep_correctness(model, tokenizer, examples, layer, ablations[layer].only(chunk), engine,
                                          args.batch_size, encoded, progress=True)
        return {f"{layer}/{neuron}": row.tolist() for neuron, row in zip(chunk, rows)}

    work = {f"layer{layer}/neurons/{chunk[0]}-{chunk[-1]}": partial(ablate_each, layer, chunk)
            for layer in layers for chunk in ds.analysis.impacts.neuron_chunks(verified[layer], args.chunk_neurons)}
    t = time.time()
    rows = run.map(work, f"verifying the top {args.verify_top} of {len(layers)} layers", unit="chunk")
    timings["sweep"] = round(time.time() - t, 2)
    context = {"layers": layers, "verified": {str(k): v for k, v in verified.items()}, "baseline": baseline.tolist(),
               "estimates": {str(k): v for k, v in estimates.items()}, "engine": engine,
               "delta_statistics": {str(layer): {"delta_variance": s["delta_variance"].tolist(),
                                                 "dt_pre_mean": s["dt_pre_mean"].tolist(),
                                                 "num_tokens": int(s["num_tokens"])} for layer, s in stats.items()},
               "documents": ds.data.pile.pile_record(texts, "statistics"),
               "model_info": ds.model.loading.describe(model), "timings": timings}
    return context, rows


def report(args, context: dict, rows: dict, examples: list, started: float) -> tuple[dict, dict | None]:
    """The atlas file's contents and, with --step1_layer, that layer's step-1 file's contents."""
    baseline = np.array(context["baseline"], dtype=float)
    records, spearman = {}, {}
    for layer in context["layers"]:
        stats = context["delta_statistics"][str(layer)]
        layer_rows = {n: np.array(rows[f"{layer}/{n}"], dtype=float) for n in context["verified"][str(layer)]}
        records[layer], spearman[layer] = ds.analysis.atlas.layer_records(examples, baseline, layer_rows,
                                                                 context["estimates"][str(layer)],
                                                                 stats["delta_variance"], args.seed)
    q_values = ds.analysis.atlas.atlas_q_values(records)
    entries = [ds.analysis.atlas.layer_entry(layer, records[layer], q_values[layer], spearman[layer],
                                    context["delta_statistics"][str(layer)]) for layer in context["layers"]]
    common = {"data_dir": args.data_dir, "ablation": args.ablation, "engine": context["engine"]}
    run_record = ds.results_io.run_record(args, context["model_info"], started, timings=context["timings"])
    provenance = ds.artifacts.Provenance(**context["provenance"])
    result = ds.analysis.atlas.atlas_result(examples, baseline, entries, provenance, parse_names(args.tasks),
                                   args.validation_size, verify_top=args.verify_top,
                                   delta_statistics_documents=context["documents"], **common,
                                   run=run_record).to_json()
    ds.analysis.atlas.print_atlas(result)
    if args.step1_layer is None:
        return result, None
    layer = args.step1_layer
    stats = {**context["delta_statistics"][str(layer)], "documents": context["documents"]}
    step1 = ds.analysis.atlas.step1_result(examples, baseline, records[layer], spearman[layer],
                                  context["estimates"][str(layer)], stats, replace(provenance, layer=layer),
                                  parse_names(args.tasks), args.validation_size, args.threshold,
                                  atlas=str(args.save_path), **common, run=run_record)
    return result, step1.to_json()


@main_guard
def main() -> None:
    args = parse_args()
    started = time.time()
    run = ds.distributed.StepRun(args, STEP, ds.distributed.fingerprint(args))
    source = None if run.merging else ds.model.loading.check_model_source(args.model, args.tokenizer)
    if source is not None:
        check_family(source)
        layers = atlas_layers(args, source.shape)
    if args.pile_path:
        ds.data.pile.local_files(args.pile_path)
    examples = ds.data.tasks.load_examples(parse_names(args.tasks), args.data_dir, "discovery", args.validation_size)
    if run.merging:
        context, rows = run.merged()
    else:
        model, tokenizer = ds.model.loading.load_model(source, args.device, args.dtype, args.max_memory,
                                                       args.offload_folder)
        context, rows = measure(args, run, model, tokenizer, layers, examples)
        context["provenance"] = ds.artifacts.Provenance.of(source, None).to_json()
    if run.publish(context, rows):
        result, step1 = report(args, context, rows, examples, started)
        with run.saving():
            ds.results_io.write_json(args.save_path, result)
            if step1 is not None:
                ds.results_io.write_json(args.save_step1, step1)
                print(f"step-1 file for layer {args.step1_layer}: {args.save_step1}")
            if not args.no_plots:
                for path in ds.analysis.plots.plot_atlas(result, args.output_dir):
                    print(f"plot: {path}")
        print(f"results: {args.save_path}")
    run.close()


if __name__ == "__main__":
    main()
