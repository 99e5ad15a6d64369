"""Step 1, delta neuron discovery: every delta neuron of a layer ablated on its own on the discovery
examples; its impact on zero-shot accuracy (baseline - ablated, points) with a paired bootstrap CI,
an exact sign test and Benjamini-Hochberg q-values. `discover` returns the step-1 file's contract."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from ..analysis import impacts
from ..analysis.metrics import chance_correctness, example_weights, summarize
from ..analysis.plots import plot_discovery
from ..analysis.stats import detection_limit, is_significant
from ..artifacts import Discovery, Provenance
from ..data.pile import load_pile_texts, local_files, pile_record
from ..data.tasks import Example, load_examples
from ..engine import attribution
from ..engine.scoring import encode_examples, score_examples
from ..engine.sweep import engine_for, projected_sweep_seconds, sweep_correctness
from ..errors import UsageError
from ..intervention import Intervention, Steering
from ..model.delta_stats import delta_statistics
from ..model.loading import ModelSource, describe
from ..model.sites import check_layer, check_neurons, num_delta_neurons
from ..model.steering import verify_steering_effect
from ..options import DiscoverOptions
from ..results_io import write_json
from .driver import Step, data_inputs, run_step, save_figures, timed


@dataclass(frozen=True)
class Plan:
    """Step 1's inputs, checked before the model loads: the neurons asked for (None when merging
    shards: they say), the discovery examples and the provenance of the file."""

    options: DiscoverOptions
    examples: list[Example]
    neurons: list[int] | None
    provenance: Provenance | None
    inputs: dict = field(default_factory=dict)  # digests of the files the results depend on


@dataclass
class Context:
    """What every process computes alike: the baseline, the delta statistics, the attribution screen."""

    neurons: list[int]  # measured exactly: all requested ones, or the screen's top and its recall sample
    requested: list[int]
    verified: list[int] | None  # the screen's top (None: no screen)
    sampled: list[int] | None  # the recall sample: screened-out neurons measured exactly
    baseline: list[float]
    delta_statistics: dict  # delta_variance, dt_pre_mean, num_tokens, documents
    estimates: list[dict] | None  # the attribution screen's, per requested neuron
    method: str  # exact or attribution (what --method auto chose)
    engine: str
    provenance: dict
    model_info: dict
    timings: dict


def plan(options: DiscoverOptions, source: ModelSource | None) -> Plan:
    neurons = provenance = None
    if source is not None:
        check_layer(source.shape, options.layer, "--layer")
        neurons = check_neurons(source.shape, options.neurons, "--neurons") if options.neurons \
            else list(range(source.shape.delta_neurons))
        provenance = Provenance.of(source, options.layer)
    if options.pile_path:
        local_files(options.pile_path)
    examples = load_examples(list(options.tasks), options.data_dir, "discovery", options.validation_size)
    return Plan(options, examples, neurons, provenance, data_inputs(options.tasks, examples, options.pile_path))


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """The context, and the correctness rows of this process's share of the neurons (under torchrun,
    all of them), by chunk: [{"neuron", "correct"}, ...]."""
    options, examples, layer, timings = plan.options, plan.examples, plan.options.layer, {}
    with timed(timings, "delta_statistics"):
        texts = load_pile_texts(options.pile_samples, options.seed, options.pile_path, role="statistics")
        stats = delta_statistics(model, tokenizer, texts, layer)
    means = [float(v) for v in stats["dt_pre_mean"]]
    ablation = Intervention.ablation(options.ablation, range(num_delta_neurons(model)), means)
    verify_steering_effect(model, Steering(layer, ablation.only(plan.neurons[:1])))

    encoded = encode_examples(tokenizer, examples)
    with timed(timings, "baseline"):
        baseline = score_examples(model, tokenizer, examples, options.batch_size, progress=True, encoded=encoded)
    print_baseline(examples, baseline, layer)

    engine, neurons, estimates, verified, sampled = engine_for(model, options.engine), plan.neurons, None, None, None
    method = choose_method(model, tokenizer, encoded, plan, ablation, engine, run)
    if method == "attribution" and not attribution.covers(model):
        method = "exact"
        print(f"note: attribution covers {', '.join(attribution.FAMILIES)} models; every neuron of --neurons is "
              "measured exactly instead")
    elif method == "attribution":
        with timed(timings, "attribution"):
            estimates, verified = attribution.attribution_screen(model, tokenizer, examples, encoded, layer, neurons,
                                                                 ablation, options.batch_size, options.verify_top)
        sampled = impacts.recall_sample([n for n in neurons if n not in verified], options.recall_sample, options.seed)
        neurons = sorted(verified + sampled)

    def ablate_each(chunk: list[int]) -> list[dict]:
        rows = sweep_correctness(model, tokenizer, examples, layer, ablation.only(chunk), engine, options.batch_size,
                                 encoded, progress=True)
        return [{"neuron": n, "correct": row.tolist()} for n, row in zip(chunk, rows)]

    work = {f"neurons/{chunk[0]}-{chunk[-1]}": partial(ablate_each, chunk)
            for chunk in impacts.neuron_chunks(neurons, options.chunk_neurons)}
    with timed(timings, "sweep"):
        results = run.map(work, f"ablating layer {layer}, {options.chunk_neurons} neurons a chunk", unit="chunk")
    statistics = {"delta_variance": stats["delta_variance"].tolist(), "dt_pre_mean": means,
                  "num_tokens": int(stats["num_tokens"]), "documents": pile_record(texts, "statistics")}
    return Context(neurons, plan.neurons, verified, sampled, baseline.tolist(), statistics, estimates, method, engine,
                   plan.provenance.to_json(), describe(model), timings), results


def choose_method(model, tokenizer, encoded, plan: Plan, ablation: Intervention, engine: str, run) -> str:
    """--method as asked, or for auto: exact when the sweep's projected time (a pilot of the engine,
    `projected_sweep_seconds`) is within --exact_budget, attribution otherwise, saying which and why;
    exact in a run split over processes, whose pilots could disagree."""
    options = plan.options
    if options.method != "auto":
        return options.method
    if run.workers.world > 1:  # each process would time its own pilot, and they might disagree
        print("--method auto: exact: a run split over processes (--shard, torchrun) does not time a pilot; "
              "--method attribution screens")
        return "exact"
    seconds = projected_sweep_seconds(model, tokenizer, encoded, options.layer, ablation.only(plan.neurons), engine,
                                      options.chunk_neurons, options.batch_size)
    method = "exact" if seconds <= options.exact_budget else "attribution"
    print(f"--method auto: {method}: the exact sweep of {len(plan.neurons)} neurons is projected at {seconds / 60:.1f} "
          f"min, {'within' if method == 'exact' else 'over'} --exact_budget {options.exact_budget / 60:g} min")
    return method


def print_baseline(examples: list[Example], baseline: np.ndarray, layer: int) -> None:
    base = summarize(examples, baseline)
    if base["accuracy"] is None:
        raise UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    chance = summarize(examples, chance_correctness(examples))
    print(f"Baseline accuracy {base['accuracy']:.2f}% (chance {chance['accuracy']:.2f}%) on {len(examples)} "
          f"discovery examples (layer {layer})")
    for name, value in base["per_task"].items():
        print(f"  {name:>24}: {value:6.2f}%  (chance {chance['per_task'][name]:5.2f}%, "
              f"{sum(e.task == name for e in examples)} examples)")


def report(plan: Plan, context: Context, results: dict, run: dict) -> Discovery:
    """Impacts, statistics and the console summary, from the measured rows: the step-1 file."""
    options, examples = plan.options, plan.examples
    rows = {r["neuron"]: r["correct"] for chunk in results.values() for r in chunk}
    baseline = np.array(context.baseline, dtype=float)
    ablated = np.array([rows[n] for n in context.neurons], dtype=float)
    unmeasured = sorted(set(context.requested) - set(context.neurons))
    records = impacts.neuron_impacts(examples, baseline, ablated, context.neurons,
                                     context.delta_statistics["delta_variance"], options.seed, unmeasured)
    screened = {} if context.estimates is None else {"attribution_estimates": context.estimates,
                                                     "verified_neurons": context.verified,
                                                     "recall_sample_neurons": context.sampled}
    screened["minimum_detectable_effect"] = detection_limit(baseline, list(ablated), example_weights(examples),
                                                            "a neuron ablated vs the baseline")
    if context.estimates is not None:
        screened.update(impacts.attach_estimates(records, context.estimates))
        impacts.print_spearman(screened, len(context.neurons))
        screened["recall"] = impacts.screen_recall(
            *significant_in(records, context.verified, context.sampled), len(context.sampled),
            len(context.requested) - len(context.verified))
    discovery = impacts.discovery_result(
        examples, baseline, records, options.threshold, Provenance(**context.provenance), list(options.tasks),
        options.validation_size, context.delta_statistics, data_dir=options.data_dir, ablation=options.ablation,
        high_impact_cut=options.high_impact_cut, engine=context.engine, method=context.method,
        neurons_tested=len(context.requested), **screened, run=run)
    if context.estimates is not None:
        discovery = replace(discovery, report={**discovery.report, "screen": impacts.screen_note(discovery.report)})
    impacts.print_summary(discovery.to_json())
    if context.estimates is not None:
        impacts.print_recall(screened["recall"])
    return discovery


def significant_in(records: list[dict], verified: list[int], sampled: list[int]) -> tuple[int, list[int]]:
    """How many of the screen's picks test significant, and which neurons of its recall sample do."""
    significant = {r["neuron"] for r in records if is_significant(r["q_value"])}
    return len(significant & set(verified)), sorted(significant & set(sampled))


def save(discovery: Discovery, args: argparse.Namespace) -> None:
    """The step-1 file at --save_path, the figures in --output_dir."""
    result = discovery.to_json()
    write_json(args.save_path, result)
    save_figures(plot_discovery, result, args)
    print(f"results: {args.save_path}")


STEP = Step("step1", DiscoverOptions, plan, measure, Context, report, save)


def discover(model, tokenizer, *, output_dir=None, overwrite: bool = False, **options) -> Discovery:
    """Step 1 on a loaded model: `options` are `DiscoverOptions`' fields (the script's options, as
    Python values: tasks=[...], neurons=[0, 1, ...]). The same Discovery the script writes for the
    same options; with `output_dir` the work is checkpointed there and a rerun resumes."""
    return run_step(STEP, model, tokenizer, options, output_dir, overwrite)
