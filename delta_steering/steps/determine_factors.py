"""Step 2, steering factors: step 1's High Impact and Neutral groups, each amplified as a whole by
each factor on held-out examples; each group's factor chosen on a selection half (the baseline is a
candidate) and tested once on the confirmation half; single-neuron impacts re-measured on held-out
examples; with `perplexity_ablation`, Pile perplexity with the High Impact group steered at each
layer. `determine_factors` returns the step-2 file's contract."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..analysis import factors as logic
from ..analysis.impacts import neuron_chunks, screen_note
from ..analysis.metrics import Comparison, chance_correctness, summarize
from ..analysis.plots import plot_factors
from ..analysis.stats import describe_detection_limit
from ..artifacts import IN_MEMORY, STEP2_NAME, Discovery, Factors, Provenance, discovery_of, factor_to_steer
from ..data.pile import load_pile_texts, local_files, pile_record
from ..data.tasks import Example, example_ids, load_examples
from ..engine.perplexity import document_losses
from ..engine.scoring import encode_examples, score_examples
from ..engine.sweep import engine_for, sweep_correctness
from ..errors import UsageError
from ..intervention import Intervention, Steering
from ..model.loading import ModelSource, describe
from ..model.sites import check_layer, num_delta_neurons
from ..model.steering import steer, verify_steering_effect
from ..options import FactorOptions
from ..results_io import write_json
from .driver import Step, data_inputs, run_step, save_figures


@dataclass(frozen=True)
class Plan:
    """Step 2's inputs, checked before the model loads: the step-1 file, the layer, the held-out
    examples, the perplexity layers and the provenance of the file."""

    options: FactorOptions
    step1: Discovery
    layer: int
    tasks: list[str]
    data_dir: str | None
    examples: list[Example]
    perplexity_layers: list[int]
    provenance: Provenance | None

    @property
    def inputs(self) -> dict:
        pile = self.options.pile_path if self.options.perplexity_ablation else None
        return {f"step-1 file {self.step1.path or IN_MEMORY}": self.step1.digest,
                **data_inputs(self.tasks, self.examples, pile)}


@dataclass
class Context:
    """What every process computes alike: the groups, the ranked neurons, the baseline."""

    layer: int
    groups: dict[str, list[int]]
    high_impact_cut: float
    factors: list[float]
    ranked: list[int]
    step1_impacts: list[dict]
    baseline: list[float]
    perplexity_layers: list[int]  # empty without --perplexity_ablation or High Impact neurons
    engine: str
    pile_documents: dict
    provenance: dict
    model_info: dict
    timings: dict


def plan(options: FactorOptions, source: ModelSource | None) -> Plan:
    step1 = discovery_of(options.neurons_file)
    layer = options.layer if options.layer is not None else step1.layer
    perplexity_layers, provenance = [], None
    if source is not None:
        check_layer(source.shape, layer, "--layer" if options.layer is not None else f"{step1.what}: layer")
        transferred = {**step1.check_model(source, options.allow_model_mismatch),
                       **step1.check_layer(layer, options.transfer_layer)}
        step1.check_against(source.shape)
        if options.perplexity_ablation:
            perplexity_layers = [check_layer(source.shape, at, "--perplexity_layers")
                                 for at in options.perplexity_layers or source.shape.ssm_layers]
        provenance = Provenance.of(source, layer, {"step1_file": step1}, transferred)
    if options.pile_path and options.perplexity_ablation:
        local_files(options.pile_path)
    tasks, data_dir = list(options.tasks or step1.tasks), options.data_dir or step1.data_dir
    examples = load_examples(tasks, data_dir, "heldout", options.num_examples)
    return Plan(options, step1, layer, tasks, data_dir, examples, perplexity_layers, provenance)


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """The context, and this process's share of the work: a group amplified by a factor ({"group",
    "factor", "correct"}), a chunk of ranked neurons ablated one at a time ([{"neuron", "correct"}]),
    Pile perplexity with the High Impact group steered at a layer ({"layer", "factor", "losses"})."""
    options, step1, layer, examples = plan.options, plan.step1, plan.layer, plan.examples
    groups, factors = step1.groups, options.steering_factors
    ablation = step1.ablation_of(range(num_delta_neurons(model)))
    ranked = logic.ranked_neurons(step1.records, options.max_neurons, options.sample_neurons, options.seed)
    verify_steering_effect(model, [Steering(layer, Intervention.scale(neurons, factors[0]))
                                   for neurons in groups.values() if neurons][:1])
    if ranked:
        verify_steering_effect(model, Steering(layer, ablation.only(ranked[:1])))
    encoded = encode_examples(tokenizer, examples)
    engine = engine_for(model, options.engine)

    def amplify(group: str, factor: float) -> dict:
        with steer(model, layer, groups[group], factor):
            correct = score_examples(model, tokenizer, examples, options.batch_size, progress=True, encoded=encoded)
        return {"group": group, "factor": factor, "correct": correct.tolist()}

    def ablate_each(chunk: list[int]) -> list[dict]:
        rows = sweep_correctness(model, tokenizer, examples, layer, ablation.only(chunk), engine, options.batch_size,
                                 encoded, progress=True)
        return [{"neuron": n, "correct": row.tolist()} for n, row in zip(chunk, rows)]

    def perplexity_at(at: int | None, factor: float | None) -> dict:
        with steer(model, at, groups["high_impact"], factor) if at is not None else nullcontext():
            losses = document_losses(model, tokenizer, texts, batch_size=options.batch_size, progress=True)
        return {"layer": at, "factor": factor, "losses": losses}

    baseline = score_examples(model, tokenizer, examples, options.batch_size, progress=True, encoded=encoded)
    base = summarize(examples, baseline)
    if base["accuracy"] is None:
        raise UsageError(f"the baseline has non-finite logits ({base['non_finite']}); try --dtype float32")
    print(f"Baseline accuracy {base['accuracy']:.2f}% on {len(examples)} held-out examples, layer {layer}")
    perplexity_layers = plan.perplexity_layers if groups["high_impact"] else []
    texts = load_pile_texts(options.pile_samples, options.seed, options.pile_path, role="evaluation") \
        if perplexity_layers else []
    context = Context(layer, groups, step1.high_impact_cut, factors, ranked, step1.records, baseline.tolist(),
                      perplexity_layers, engine, pile_record(texts, "evaluation"), plan.provenance.to_json(),
                      describe(model), {})

    work = {f"factor/{g}/{f!r}": partial(amplify, g, f) for g, neurons in groups.items() if neurons for f in factors}
    work.update({f"neurons/{chunk[0]}-{chunk[-1]}": partial(ablate_each, chunk)
                 for chunk in neuron_chunks(ranked, options.chunk_neurons)})
    if perplexity_layers:
        work["perplexity/baseline"] = partial(perplexity_at, None, None)
        work.update({f"perplexity/{at}/0.0": partial(perplexity_at, at, 0.0) for at in perplexity_layers})
    results = run.map(work, "amplifying groups, ablating ranked neurons")
    if perplexity_layers:
        # the amplified perplexities need the High Impact factor: a slice computes (and checkpoints)
        # the factor results it lacks, the same computations as every other slice's
        missing = {f"factor/high_impact/{f!r}": partial(amplify, "high_impact", f) for f in factors
                   if f"factor/high_impact/{f!r}" not in results}
        if missing:
            results.update(run.map(missing, "High Impact factors for perplexity", shared=False))
        factor, _ = factor_to_steer(group_table("high_impact", context, results, examples, options.seed)["optimal"])
        if factor is not None:
            amplified = {f"perplexity/{at}/{factor!r}": partial(perplexity_at, at, factor) for at in perplexity_layers}
            results.update(run.map(amplified, "perplexity with the optimal factor"))
    return context, results


def payloads(results: dict, *keys: str) -> list:
    """The results of the work items whose payloads have `keys` (one kind of item)."""
    return [p for p in results.values() if isinstance(p, dict) and all(k in p for k in keys)]


def group_table(name: str, context: Context, results: dict, examples: list[Example], seed: int) -> dict:
    """A group's neurons, its selection table and its optimal factor."""
    neurons = context.groups[name]
    rows = {p["factor"]: np.array(p["correct"], dtype=float) for p in payloads(results, "group", "correct")
            if p["group"] == name} if neurons else {}
    return logic.group_result(neurons, context.factors, rows, examples, np.array(context.baseline, dtype=float), seed)


def report(plan: Plan, context: Context, results: dict, run: dict) -> Factors:
    """Factor tables, optimal factors, importance ranking and perplexity, from the measured results:
    the step-2 file."""
    options, examples, layer = plan.options, plan.examples, context.layer
    baseline = np.array(context.baseline, dtype=float)
    base = summarize(examples, baseline)
    selection, confirmation = logic.selection_split(examples)
    result = {"description": logic.DESCRIPTION, "tasks": plan.tasks, "data_dir": plan.data_dir,
              "num_examples": options.num_examples, "high_impact_cut": context.high_impact_cut,
              "baseline_accuracy": base["accuracy"], "per_task_baseline": base["per_task"],
              "chance_accuracy": summarize(examples, chance_correctness(examples))["accuracy"],
              "groups": {},
              "selection_examples": example_ids([examples[i] for i in selection]),
              "confirmation_examples": example_ids([examples[i] for i in confirmation]),
              "selection_baseline_accuracy": summarize([examples[i] for i in selection],
                                                       baseline[selection])["accuracy"],
              "confirmation_baseline_accuracy": summarize([examples[i] for i in confirmation],
                                                          baseline[confirmation])["accuracy"]}
    amplified = [p["correct"] for p in payloads(results, "group", "correct")]
    limit = logic.confirmation_limit(examples, baseline, amplified)
    result["minimum_detectable_effect"] = limit
    for name in context.groups:
        result["groups"][name] = group_table(name, context, results, examples, options.seed)
        logic.print_group_table(name, result["groups"][name], layer, limit)
    print("\n" + describe_detection_limit(limit))
    result["optimal_factors"] = {n: g.pop("optimal") for n, g in result["groups"].items()}

    print(f"\nImportance ranking: {len(context.ranked)} neurons ablated one at a time on held-out examples")
    rows = {r["neuron"]: r["correct"] for p in results.values() if isinstance(p, list) for r in p}
    ablated = [np.array(rows[n], dtype=float) for n in context.ranked]
    ranking = logic.importance_ranking(context.step1_impacts, ablated, context.ranked,
                                       Comparison(examples, baseline, options.seed))
    result["importance_ranking"] = ranking
    rho = ranking["spearman_step1_vs_heldout"]
    print(f"Spearman correlation of step-1 and held-out impacts: {'n/a' if rho is None else f'{rho:.3f}'}")
    if options.perplexity_ablation and context.perplexity_layers:
        losses = {(p["layer"], p["factor"]): p["losses"] for p in payloads(results, "losses")}
        result["perplexity"] = logic.perplexity_table(context.groups["high_impact"], context.perplexity_layers,
                                                      context.pile_documents, losses,
                                                      result["optimal_factors"].get("high_impact"), options.seed)
    elif options.perplexity_ablation:
        print("perplexity ablation skipped: the High Impact group is empty")
    result["engine"] = context.engine
    note = screen_note(plan.step1.report)
    if note:
        result["step1_screen"] = f"the step-1 file comes from {note}"
        print(f"\nnote: {result['step1_screen']}")
    result["run"] = run
    groups, optimal = result.pop("groups"), result.pop("optimal_factors")
    return Factors(Provenance(**context.provenance), groups=groups, optimal=optimal, report=result)


def save(factors: Factors, args: argparse.Namespace) -> None:
    """The step-2 file and the figures in --output_dir."""
    result = factors.to_json()
    path = write_json(Path(args.output_dir) / STEP2_NAME, result)
    save_figures(plot_factors, result, args)
    print(f"results: {path}")


STEP = Step("step2", FactorOptions, plan, measure, Context, report, save)


def determine_factors(model, tokenizer, neurons_file=None, *, output_dir=None, overwrite: bool = False,
                      **options) -> Factors:
    """Step 2 on a loaded model: `neurons_file` the step-1 contract (a Discovery, as `discover`
    returns it, or a step-1 file's path), `options` `FactorOptions`' other fields (factors=[2.0, 5.0],
    num_examples=100, ...). The same Factors the script writes for the same options; with
    `output_dir` the work is checkpointed there and a rerun resumes."""
    return run_step(STEP, model, tokenizer, {"neurons_file": neurons_file, **options}, output_dir, overwrite)
