"""The delta atlas: every delta neuron of every SSM layer (or of `layers`) ablated alone, estimated to
first order by attribution from one forward and one backward pass per batch; the `verify_top` neurons
of each layer with the largest estimated impact re-measured exactly; Benjamini-Hochberg over every
neuron of every layer. `atlas` returns the atlas file's contract (and, with `step1_layer`, that layer
as a step-1 file's)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

import numpy as np

from ..analysis import atlas as logic
from ..analysis.impacts import recall_sample, top_estimated
from ..analysis.metrics import example_weights, summarize
from ..analysis.plots import plot_atlas
from ..analysis.stats import detection_limit
from ..artifacts import Discovery, Provenance, Results
from ..data.pile import load_pile_texts, local_files, pile_record
from ..data.tasks import Example, load_examples
from ..engine.attribution import FAMILIES, atlas_estimates
from ..engine.scoring import encode_examples, score_examples
from ..engine.sweep import engine_for, layer_sweeps
from ..errors import UsageError
from ..intervention import Intervention, Steering
from ..model.delta_stats import layer_delta_statistics
from ..model.loading import ModelSource, compact_ranges, describe
from ..model.sites import check_layer, family_of, num_delta_neurons
from ..model.steering import verify_steering_effect
from ..options import AtlasOptions
from ..results_io import write_json
from .driver import Step, data_inputs, run_step, save_figures, timed


@dataclass(frozen=True)
class Atlas:
    """The atlas's outputs: the atlas file and, with `step1_layer`, that layer as a step-1 file."""

    atlas: Results
    step1: Discovery | None

    def to_json(self) -> dict:
        return self.atlas.to_json()


@dataclass(frozen=True)
class Plan:
    """The atlas's inputs, checked before the model loads: the layers (None when merging shards: they
    say), the discovery examples and the provenance of the file."""

    options: AtlasOptions
    examples: list[Example]
    layers: list[int] | None
    provenance: Provenance | None
    inputs: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every process computes alike: the delta statistics, the baseline, the attribution pass."""

    layers: list[int]
    verified: dict[str, list[int]]  # layer -> the screen's picks
    sampled: dict[str, list[int]]  # layer -> its neurons in the recall sample (screened out, measured exactly)
    baseline: list[float]
    estimates: dict[str, list[dict]]  # layer -> every neuron's estimates
    engine: str
    delta_statistics: dict[str, dict]  # layer -> delta_variance, dt_pre_mean, num_tokens
    documents: dict
    provenance: dict
    model_info: dict
    timings: dict


def plan(options: AtlasOptions, source: ModelSource | None) -> Plan:
    layers = provenance = None
    if source is not None:
        family = family_of(source.model_config).name
        if family not in FAMILIES:
            raise UsageError(f"the atlas needs attribution, which covers {', '.join(FAMILIES)} models, not "
                             f"{family}; run step 1 per layer instead")
        layers = [check_layer(source.shape, layer, "--layers") for layer in options.layers or source.shape.ssm_layers]
        if options.step1_layer is not None and options.step1_layer not in layers:
            raise UsageError(f"--step1_layer {options.step1_layer} is not among the atlas's layers "
                             f"({compact_ranges(layers)})")
        provenance = Provenance.of(source, None)
    if options.pile_path:
        local_files(options.pile_path)
    examples = load_examples(list(options.tasks), options.data_dir, "discovery", options.validation_size)
    return Plan(options, examples, layers, provenance, data_inputs(options.tasks, examples, options.pile_path))


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """The context, and the correctness rows of this process's share of the verified neurons, by
    chunk of one layer's: [{"layer", "neuron", "correct"}, ...]."""
    options, examples, layers, timings = plan.options, plan.examples, plan.layers, {}
    n = num_delta_neurons(model)
    with timed(timings, "delta_statistics"):
        texts = load_pile_texts(options.pile_samples, options.seed, options.pile_path, role="statistics")
        stats = layer_delta_statistics(model, tokenizer, texts, layers)
    ablations = {layer: Intervention.ablation(options.ablation, range(n), stats[layer]["dt_pre_mean"].tolist())
                 for layer in layers}
    verify_steering_effect(model, Steering(layers[0], ablations[layers[0]].only([0])))
    encoded = encode_examples(tokenizer, examples)
    with timed(timings, "baseline"):
        baseline = score_examples(model, tokenizer, examples, options.batch_size, progress=True, encoded=encoded)
    if summarize(examples, baseline)["accuracy"] is None:
        raise UsageError("the baseline has non-finite logits; try --dtype float32")
    with timed(timings, "attribution"):
        estimates = atlas_estimates(model, tokenizer, examples, encoded, ablations, options.batch_size, progress=True)
    verified = {layer: top_estimated(estimates[layer], options.verify_top) for layer in layers}
    screened_out = [(layer, neuron) for layer in layers for neuron in range(n) if neuron not in verified[layer]]
    picked = recall_sample(screened_out, options.recall_sample, options.seed)
    sampled = {layer: [n for at, n in picked if at == layer] for layer in layers}
    engine = engine_for(model, options.engine)

    measured = {layer: sorted(verified[layer] + sampled[layer]) for layer in layers}
    work = layer_sweeps(model, tokenizer, examples, measured, ablations, options.chunk_neurons, engine,
                        options.batch_size, encoded)
    with timed(timings, "sweep"):
        results = run.map(work, f"verifying the top {options.verify_top} of {len(layers)} layers and a recall sample "
                                f"of {len(picked)}", unit="chunk")
    statistics = {str(layer): {"delta_variance": s["delta_variance"].tolist(), "dt_pre_mean": s["dt_pre_mean"].tolist(),
                               "num_tokens": int(s["num_tokens"])} for layer, s in stats.items()}
    return Context(layers, {str(k): v for k, v in verified.items()}, {str(k): v for k, v in sampled.items()},
                   baseline.tolist(),
                   {str(k): v for k, v in estimates.items()}, engine, statistics, pile_record(texts, "statistics"),
                   plan.provenance.to_json(), describe(model), timings), results


def report(plan: Plan, context: Context, results: dict, run: dict) -> Atlas:
    """The atlas file and, with `step1_layer`, that layer's step-1 file."""
    options, examples = plan.options, plan.examples
    baseline = np.array(context.baseline, dtype=float)
    rows = {(r["layer"], r["neuron"]): r["correct"] for chunk in results.values() for r in chunk}
    records, spearman, limits = {}, {}, {}
    for layer in context.layers:
        stats, sampled = context.delta_statistics[str(layer)], context.sampled[str(layer)]
        layer_rows = {n: np.array(rows[(layer, n)], dtype=float) for n in context.verified[str(layer)] + sampled}
        records[layer], spearman[layer] = logic.layer_records(examples, baseline, layer_rows,
                                                              context.estimates[str(layer)], stats["delta_variance"],
                                                              options.seed, sampled)
        limits[layer] = detection_limit(baseline, list(layer_rows.values()), example_weights(examples),
                                        "a neuron ablated vs the baseline")
    q_values = logic.atlas_q_values(records)
    entries = [logic.layer_entry(layer, records[layer], q_values[layer], spearman[layer],
                                 context.delta_statistics[str(layer)]) for layer in context.layers]
    common = {"data_dir": options.data_dir, "ablation": options.ablation, "engine": context.engine}
    provenance = Provenance(**context.provenance)
    total = sum(len(e["estimated_impact"]) for e in entries)
    atlas = logic.atlas_result(examples, baseline, entries, provenance, list(options.tasks), options.validation_size,
                               verify_top=options.verify_top, recall=logic.atlas_recall(entries, total),
                               delta_statistics_documents=context.documents, **common, run=run)
    logic.print_atlas(atlas.to_json())
    step1 = None
    if options.step1_layer is not None:
        layer = options.step1_layer
        stats = {**context.delta_statistics[str(layer)], "documents": context.documents}
        step1 = logic.step1_result(examples, baseline, records[layer], spearman[layer], context.estimates[str(layer)],
                                   stats, replace(provenance, layer=layer), list(options.tasks),
                                   options.validation_size, options.threshold, atlas=None,
                                   minimum_detectable_effect=limits[layer], **common,
                                   recall={**atlas.report["recall"], "scope": "the atlas's: a sample of every layer's "
                                           "screened-out neurons, significance atlas-wide"},
                                   run=run)
    return Atlas(atlas, step1)


def save(atlas: Atlas, args: argparse.Namespace) -> None:
    """The atlas file at --save_path, the step-1 file at --save_step1, the figure in --output_dir."""
    result = atlas.to_json()
    write_json(args.save_path, result)
    if atlas.step1 is not None:  # it names the atlas file it was made with
        step1 = replace(atlas.step1, report={**atlas.step1.report, "atlas": str(args.save_path)})
        write_json(args.save_step1, step1.to_json())
        print(f"step-1 file for layer {args.step1_layer}: {args.save_step1}")
    save_figures(plot_atlas, result, args)
    print(f"results: {args.save_path}")


STEP = Step("atlas", AtlasOptions, plan, measure, Context, report, save)


def atlas(model, tokenizer, *, output_dir=None, overwrite: bool = False, **options) -> Atlas:
    """The atlas on a loaded model: `options` are `AtlasOptions`' fields (layers=[16, 17, ...],
    verify_top=20, step1_layer=...). The same files the script writes for the same options; with
    `output_dir` the work is checkpointed there and a rerun resumes."""
    return run_step(STEP, model, tokenizer, options, output_dir, overwrite)
