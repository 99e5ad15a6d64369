"""Step 3, verification: steered configurations (the delta-sensitive, random and high-variance sets,
amplified or ablated at the layer, or amplified at each of several layers) and the baseline on the
same IFEval prompts (greedy generation) and Pile documents. `verify` returns step 3's contract."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from ..analysis import verification as logic
from ..analysis.metrics import perplexity_of
from ..analysis.plots import plot_verification
from ..artifacts import (IN_MEMORY, STEP3_FILES, Discovery, Factors, Provenance, Results, Verification,
                         discovery_of, factors_of)
from ..data.ifeval import METRICS, load_ifeval_prompts, match_responses, score_responses
from ..data.pile import load_pile_texts, local_files, pile_record
from ..engine.generation import generate_greedy
from ..engine.perplexity import document_losses
from ..errors import UsageError
from ..intervention import Steering
from ..model.loading import ModelSource, describe
from ..model.sites import Shape, check_layer, shape_of
from ..model.steering import apply, verify_steering_effect
from ..options import VerifyOptions
from ..results_io import read_jsonl, write_json, write_jsonl
from .driver import Step, data_inputs, run_step


@dataclass(frozen=True)
class Plan:
    """Step 3's inputs, checked before the model loads: the step files, the layer, the factor and
    its standing, the prompts and the provenance of the files."""

    options: VerifyOptions
    step1: Discovery
    step2: Factors | None
    layer: int
    factor: float
    factor_source: str
    standing: str
    prompts: list[dict]
    provenance: Provenance | None

    @property
    def inputs(self) -> dict:
        files = {f"step-1 file {self.step1.path or IN_MEMORY}": self.step1.digest}
        if self.step2 is not None:
            files[f"step-2 file {self.step2.path or IN_MEMORY}"] = self.step2.digest
        return {**files, **data_inputs(pile_path=self.options.pile_path, ifeval_path=self.options.ifeval_path)}


@dataclass
class Context:
    """What every process computes alike: the sets, the layers, the factor."""

    modes: list[str]
    layer: int
    layers: list[int]
    factor: float
    factor_source: str
    factor_standing: str
    ablation: str
    sets: dict[str, list[int]]
    num_prompts: int
    pile_documents: dict
    provenance: dict
    model_info: dict
    timings: dict


def layer_ablation_layers(options: VerifyOptions, shape: Shape, layer: int) -> list[int]:
    """`layers`, each checked to be an SSM layer of the model; by default the SSM layers around
    `layer`: two before, itself, two after."""
    if options.layers is None:
        at = shape.ssm_layers.index(layer)
        return list(shape.ssm_layers[max(0, at - 2): at + 3])
    return [check_layer(shape, at, "--layers") for at in options.layers]


def steering_factor(options: VerifyOptions, step2: Factors | None) -> tuple[float, str, str]:
    """`factor` ("command-line"), else step 2's High Impact factor: the confirmed one
    ("step2-confirmed") or the selection-best one ("step2-unconfirmed"); and the factor's standing
    in one line."""
    if step2 is None:
        return options.factor, "command-line", logic.factor_standing(options.factor, "command-line", None)
    factor, source = step2.steering_factor("high_impact")
    if factor is None:
        raise UsageError(f"{step2.what} has no High Impact factor (optimal_factors.high_impact); pass --factor")
    return factor, source, logic.factor_standing(factor, source, step2.optimal.get("high_impact"))


def plan(options: VerifyOptions, source: ModelSource | None) -> Plan:
    step1 = discovery_of(options.neurons_file)
    step2 = None if options.factor is not None else factors_of(options.factors_file)
    layer = options.layer if options.layer is not None else step1.layer
    factor, factor_source, standing = steering_factor(options, step2)
    provenance = None
    if source is not None:
        check_layer(source.shape, layer, "--layer" if options.layer is not None else f"{step1.what}: layer")
        transferred = {**step1.check_model(source, options.allow_model_mismatch),
                       **step1.check_layer(layer, options.transfer_layer)}
        if step2 is not None:
            step2.check_model(source, options.allow_model_mismatch)
            step2.check_input("step1_file", step1)
            transferred.update(step2.check_layer(layer, options.transfer_layer))
        step1.check_against(source.shape)
        if "layer_ablation" in options.modes:
            layer_ablation_layers(options, source.shape, layer)
        inputs = {"step1_file": step1, **({"step2_file": step2} if step2 else {})}
        provenance = Provenance.of(source, layer, inputs, transferred)
    if options.pile_path:
        local_files(options.pile_path)
    prompts = load_ifeval_prompts(options.ifeval_path, options.num_samples)
    return Plan(options, step1, step2, layer, factor, factor_source, standing, prompts, provenance)


def planned(context: Context, dt_pre_mean: list[float], mode: str | None = None) -> dict[str, Steering]:
    """The configurations of one mode, or of all the run's modes, by name, baseline first."""
    return {name: c for m in ([mode] if mode else context.modes)
            for name, c in logic.configurations(m, context.sets, context.layer, context.layers, context.factor,
                                                context.ablation, dt_pre_mean).items()}


def run_configuration(model, tokenizer, steering: Steering, prompts: list[dict], texts: list[str] | None,
                      max_new_tokens: int, batch_size: int | None) -> logic.Outcome:
    """Generate for every prompt with the configuration's steering active, score, measure perplexity."""
    started = time.time()
    with apply(model, steering):
        responses = generate_greedy(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens, batch_size,
                                    progress=True)
        losses = document_losses(model, tokenizer, texts, batch_size=batch_size, progress=True) if texts else None
    return logic.Outcome(responses, score_responses(prompts, responses),
                         None if losses is None else perplexity_of(losses), round(time.time() - started, 2), losses)


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """The context, and the outcome of this process's share of the configurations (by name), each
    run once even when several modes use it (the baseline)."""
    options, shape = plan.options, shape_of(model)
    modes = list(options.modes)
    layers = layer_ablation_layers(options, shape, plan.layer) if "layer_ablation" in modes else []
    sets, warnings = logic.neuron_sets(plan.step1, shape.delta_neurons, options.seed)
    for warning in warnings:
        print(f"warning: {warning}")
    texts = load_pile_texts(options.pile_samples, options.seed, options.pile_path, role="evaluation")
    print(f"{plan.standing}\n{len(plan.prompts)} IFEval prompts, {len(texts)} Pile documents; delta-sensitive set of "
          f"{len(sets['delta_sensitive'])} neurons at layer {plan.layer}")
    context = Context(modes, plan.layer, layers, plan.factor, plan.factor_source, plan.standing, plan.step1.ablation,
                      sets, len(plan.prompts), pile_record(texts, "evaluation"), plan.provenance.to_json(),
                      describe(model), {})
    configurations = planned(context, plan.step1.dt_pre_mean)
    verify_steering_effect(model, [c for c in configurations.values() if c.neurons][:1])

    def outcome(name: str, steering: Steering) -> dict:
        print(f"\n[{name}] {logic.configuration_description(name, steering)}")
        return asdict(run_configuration(model, tokenizer, steering, plan.prompts, texts, options.max_new_tokens,
                                        options.batch_size))

    work = {name: partial(outcome, name, c) for name, c in configurations.items()}
    return context, run.map(work, "configurations", unit="configuration")


def report(plan: Plan, context: Context, results: dict, run: dict) -> Verification:
    """Per mode: the configurations compared with the baseline, the table; and every configuration's
    responses."""
    metric, seed = plan.options.ifeval_metric, plan.options.seed
    common = {"factor": context.factor, "factor_source": context.factor_source,
              "factor_standing": context.factor_standing, "sets": context.sets, "ifeval_metric": metric,
              "num_prompts": context.num_prompts, "pile_documents": context.pile_documents}
    outcomes = {name: logic.Outcome(**record) for name, record in results.items()}
    modes = {}
    print(f"\n{context.factor_standing}")
    for mode in context.modes:
        chosen = planned(context, plan.step1.dt_pre_mean, mode)
        entries = [logic.entry(name, c, outcomes[name], outcomes["baseline"], metric, seed)
                   for name, c in chosen.items()]
        limit = logic.prompt_limit([outcomes[name] for name in chosen if name != "baseline"], outcomes["baseline"],
                                   metric)
        title = logic.mode_title(mode, context.factor, context.layer, context.layers, context.ablation)
        modes[mode] = Results(Provenance(**context.provenance), step="step3", report={
            **common, "mode": mode, "mode_title": title, "description": f"{title}. {logic.DESCRIPTION}",
            "configurations": entries, "minimum_detectable_effect": limit, "run": run})
        logic.print_summary(title, entries, metric, context.factor, context.factor_source, limit)
    return Verification(modes, {name: logic.response_rows(o) for name, o in outcomes.items()})


def save(verification: Verification, args: argparse.Namespace) -> None:
    """Each mode's JSON, every configuration's responses, the plots."""
    output_dir, records = Path(args.output_dir), verification.to_json()
    for mode, record in records.items():
        for entry in record["configurations"]:
            write_jsonl(output_dir / f"responses_{entry['name']}.jsonl", verification.responses[entry["name"]])
        print(f"results: {write_json(output_dir / STEP3_FILES[mode], record)}")
    if not args.no_plots:
        for plot in plot_verification(records, output_dir):
            print(f"plot: {plot}")


STEP = Step("step3", VerifyOptions, plan, measure, Context, report, save)


def verify(model, tokenizer, neurons_file=None, factors_file=None, *, output_dir=None, overwrite: bool = False,
           **options) -> Verification:
    """Step 3 on a loaded model: `neurons_file` and `factors_file` the step-1 and step-2 contracts (as
    `discover` and `determine_factors` return them, or their files' paths; `factor=` instead of the
    step-2 one), `options` `VerifyOptions`' other fields (modes=["combined"], num_samples=100, ...).
    The same results the script writes for the same options; with `output_dir` the work is
    checkpointed there and a rerun resumes."""
    return run_step(STEP, model, tokenizer, {"neurons_file": neurons_file, "factors_file": factors_file, **options},
                    output_dir, overwrite)


def score_response_file(path: str, ifeval_path: str | None, output_dir: str) -> Path:
    """The four IFEval metrics of a JSONL of {"prompt", "response"}, printed and saved; no model."""
    prompts = load_ifeval_prompts(ifeval_path)
    scores = score_responses(prompts, match_responses(prompts, read_jsonl(path, "response file")))
    for name in METRICS:
        print(f"{name:>24}: {scores['metrics'][name]:.2f}")
    return write_json(Path(output_dir) / f"{Path(path).stem}_scores.json",
                      {"response_file": path, "ifeval_path": ifeval_path, **scores})
